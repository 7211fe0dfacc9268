"""The public gRPC entry point for loggers: validates and forwards readings."""
