"""Data-driven selection: ThiNet, Channel Pruning (LASSO), LDRF, NISP, activation criteria."""
