"""Analytics domain: pure, no I/O."""
