"""Shared core: configuration, event model, Redis key layout, connections, local services."""
