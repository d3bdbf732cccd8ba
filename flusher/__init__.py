"""The flusher: moves Redis counters into PostgreSQL exactly once (the CronJob's program)."""
