"""Latency / throughput benchmarks of the served stack against the eager in-process pipeline."""
