"""Billing domain: pure, no I/O."""
