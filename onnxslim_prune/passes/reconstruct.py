"""Least-squares reconstruction of the consumers of pruned channels from calibration data."""
