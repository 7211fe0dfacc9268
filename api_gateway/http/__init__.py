"""The gateway's HTTP/JSON API: the gRPC contract's ``google.api.http`` routes, transcoded."""
