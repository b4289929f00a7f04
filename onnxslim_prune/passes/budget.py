"""Global budgets (--target-macs / --target-params) and layer-compensated pruning (Chin et al. 2018)."""
