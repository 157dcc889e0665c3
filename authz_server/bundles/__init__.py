"""Policy bundles from an OPA control plane: download, verify, activate, report (docs/bundles.md)."""
