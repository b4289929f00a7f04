"""Neuron Merging (Kim et al., NeurIPS 2020). Filled in by the merge work."""
