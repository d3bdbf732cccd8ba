"""The ingest sidecar: validates events and counts them in Redis, acknowledging only once stored."""
