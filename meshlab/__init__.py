"""meshlab: a local multi-node cluster built from network namespaces, for the demo, tests and benchmarks."""
