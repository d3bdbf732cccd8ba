"""The read side: exact queries (PostgreSQL totals + unflushed Redis), the /v1 read endpoints, the dashboard."""
