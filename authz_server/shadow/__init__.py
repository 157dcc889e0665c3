"""Shadow rollout: a second policy decides every sampled request beside the live one, off the
request path, and every disagreement is counted and written down (docs/bundles.md)."""
