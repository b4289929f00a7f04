"""The plain data of a channel trace: atoms, channel maps, groups, and what the tracer decided.

Every later pass reads these; nothing here touches a graph. `Kind` says how the tracer
treated a node (the rule that slices, costs and refits it follows from it), `Role` says
where a group's channels live in a node. Both are `str` enums: they compare equal to, and
serialise as, the plain strings earlier versions wrote, so reports and JSON are unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

import numpy as np

Shape = tuple[int, ...]


class _StrEnum(str, Enum):
    """A str-valued enum whose `str()` and f-string form is its value (as `enum.StrEnum` of 3.11)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class Kind(_StrEnum):
    """How the tracer treated a node (`Trace.node_kind`)."""

    CONV = "conv"
    DEPTHWISE = "depthwise"
    GROUPED = "grouped"
    CONV_TRANSPOSE = "conv_transpose"
    GEMM = "gemm"
    MATMUL = "matmul"
    NORM = "norm"
    CONST_OPERAND = "const_operand"  # a broadcasting op with a constant operand sliced on the channel axis
    CONCAT = "concat"
    SPLIT = "split"
    SLICE = "slice"
    RESIZE = "resize"
    SHAPE = "shape"
    FROZEN = "frozen"
    # block mappings: one per op (Flatten / Squeeze / Unsqueeze follow their input, only Reshape is rewritten)
    RESHAPE = "reshape"
    FLATTEN = "flatten"
    SQUEEZE = "squeeze"
    UNSQUEEZE = "unsqueeze"
    # attention (ops.attention)
    BATCH_MATMUL = "batch_matmul"  # a MatMul between two activations (scores, context)
    EMBEDDING = "embedding"  # a Gather of rows of a constant table: the table's last axis is a space
    EXPAND = "expand"
    LAYER_NORM = "layer_norm"  # LayerNormalization over the channel axis: gamma and beta sliced
    CHANNEL_MEAN = "channel_mean"  # ReduceMean over the channel axis (a decomposed LayerNorm / RMSNorm)
    FUSED_ATTENTION = "fused_attention"  # a fused attention op: heads through its attributes (ops.fused_attention)


#: kinds of a weighted op with its own weight to slice (a source and a consumer)
WEIGHTED_KINDS = frozenset({Kind.CONV, Kind.GROUPED, Kind.GEMM, Kind.MATMUL, Kind.CONV_TRANSPOSE, Kind.DEPTHWISE})


class Role(_StrEnum):
    """Where a group's channels live in a node (`Member.role`)."""

    OUT = "out"  # the output channels of a source
    IN = "in"  # the input channels of a consumer
    DEPTHWISE = "depthwise"  # input and output of a depthwise conv, coupled
    NORM = "norm"  # per-channel parameters (BatchNormalization, InstanceNormalization)
    PASS = "pass"  # channels pass through unchanged
    ELEMENTWISE = "elementwise"  # operands of a broadcasting op, united
    CONCAT = "concat"
    SPLIT = "split"
    SLICE = "slice"
    RESHAPE = "reshape"
    RESIZE = "resize"
    HEADS = "heads"  # channels on a batch axis of a MatMul between activations (attention heads)
    FROZEN = "frozen"  # an op the tracer does not understand: its channels stay


class TransformerPart(_StrEnum):
    """What a group is in a transformer (`transformer_part`): the unit of ``--heads`` / ``--ffn`` / ``--hidden``."""

    HEADS = "heads"  # attention heads: channels on a batch axis of a MatMul between activations
    HIDDEN = "hidden"  # the residual stream: through a LayerNorm / RMSNorm or an embedding table
    FFN = "ffn"  # every other group (FFN neurons; all groups of a network without attention)


def transformer_part(node_kind: Mapping[str, Kind], group: Group) -> TransformerPart:
    """The `TransformerPart` of `group`, from its members' roles and kinds."""
    if any(m.role == Role.HEADS for m in group.members):
        return TransformerPart.HEADS
    hidden = (Kind.LAYER_NORM, Kind.CHANNEL_MEAN, Kind.EMBEDDING)
    if any(node_kind.get(m.node) in hidden for m in group.members):
        return TransformerPart.HIDDEN
    return TransformerPart.FFN


@dataclass(frozen=True, eq=False)
class ChannelMap:
    """A tensor's channel axis and, per position along it, the atom it holds."""

    axis: int
    atoms: np.ndarray

    @property
    def size(self) -> int:
        return int(self.atoms.size)


@dataclass(frozen=True)
class Source:
    """Output channels created by a weighted op: `weight` sliced along `axis`."""

    node: str
    op: str
    weight: str
    axis: int
    space: int


@dataclass(frozen=True)
class Member:
    """One place a group's channels live: (node, role), e.g. ("conv3", Role.IN)."""

    node: str
    op: str
    role: Role


@dataclass(frozen=True)
class Group:
    """Coupled channels: `size` classes, pruned together across all `members`."""

    index: int
    spaces: tuple[int, ...]
    classes: tuple[int, ...]  # union-find roots, in channel order of the first space
    frozen: tuple[bool, ...]  # per class
    reasons: tuple[str, ...]
    members: tuple[Member, ...]
    block: int  # grouped conv: the kept count must be equal in each of `block` contiguous blocks
    macs: int

    @property
    def size(self) -> int:
        return len(self.classes)

    @property
    def prunable(self) -> int:
        return sum(1 for f in self.frozen if not f)

    @property
    def is_frozen(self) -> bool:
        return self.prunable == 0


@dataclass(frozen=True, eq=False)
class Trace:
    """Everything later passes need, as plain data."""

    groups: tuple[Group, ...]
    maps: Mapping[str, ChannelMap]  # tensor name -> channel map
    sources: tuple[Source, ...]
    roots: np.ndarray  # atom -> class root
    class_group: Mapping[int, int]  # class root -> group index
    node_kind: Mapping[str, Kind]  # node name -> how it was treated
    space_atoms: Mapping[int, np.ndarray]
    shapes: Mapping[str, Shape]
    node_macs: Mapping[str, int]

    def group_of_node(self, node: str) -> list[Group]:
        return [g for g in self.groups if any(m.node == node for m in g.members)]

    def class_positions(self, tensor: str) -> np.ndarray | None:
        """Per position of `tensor`'s channel axis, its class root (None if untraced)."""
        cmap = self.maps.get(tensor)
        return None if cmap is None else self.roots[cmap.atoms]


class UnionFind:
    """Union-find over integer atoms; the smaller index becomes the root (roots are deterministic)."""

    def __init__(self) -> None:
        self.parent: list[int] = []

    def make(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, a: int) -> int:
        parent = self.parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if ra < rb:
                self.parent[rb] = ra
            else:
                self.parent[ra] = rb

    def roots(self) -> np.ndarray:
        return np.array([self.find(a) for a in range(len(self.parent))], dtype=np.int64)
