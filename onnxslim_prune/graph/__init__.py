"""The graph layer: `edit` is the only module that writes nodes and tensors."""
