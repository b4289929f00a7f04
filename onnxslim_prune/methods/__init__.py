"""Pruning methods: each one `MethodSpec` (`base`), all registered in `builtin`.

This package's `__init__` imports nothing, so the method implementations can import
`methods.base` without a circle; `builtin` (imported by `api`) fills the registry.
"""
