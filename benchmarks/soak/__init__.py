"""Soak / chaos check of a running stack: a seeded storm of random calls with random cancels, deadlines, killed
clients and reset connections, then the invariants a healthy stack keeps (`python -m benchmarks.soak --help`)."""
