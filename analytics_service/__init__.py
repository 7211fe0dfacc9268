"""The business view of readings as Prometheus metrics on :9100."""
