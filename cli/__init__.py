"""analytics-pipeline: Kubernetes-native event analytics (sidecar -> Redis -> flusher -> PostgreSQL)."""

__version__ = "0.1.0"
