"""Planning across runs: per-group sensitivity, non-uniform allocation and the gated search (`planning.search`)."""
