"""Op rules, one module per family; importing this package registers them all (`registry.lookup`)."""

from . import attention, elementwise, fused_attention, layout, norm, quant, reduce, weighted  # noqa: F401  (they register their rules)
from .registry import Freeze, NodeCost, OpRule, lookup, register

__all__ = ["Freeze", "NodeCost", "OpRule", "lookup", "register"]
