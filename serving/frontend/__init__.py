"""The public gRPC front end: validation, admission, Triton forwarding, health, reflection and metrics."""
