"""Consumes readings into MongoDB (source of truth) and Redis (cache), exactly once."""
