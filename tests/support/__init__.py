"""Shared test helpers: real processes (Envoy, redis-server), readiness by checks."""
