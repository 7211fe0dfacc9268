"""Developer tools run with ``python -m scripts.<name>`` (for example the logger simulator)."""
