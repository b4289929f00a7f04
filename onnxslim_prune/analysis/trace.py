"""Trace which channels are coupled: the dependency graph of channel slices.

Model. Every *source* (the output channels of a Conv, ConvTranspose, Gemm or MatMul
with a constant weight) creates a *space*: a block of fresh channel atoms, one per
output channel. Each traced tensor carries a `ChannelMap` (its channel axis and, for
every position along that axis, the atom it holds). Ops move maps along:

* per-channel ops (BN, activations, pooling, ...) copy the map;
* elementwise ops with broadcasting *unite* the atoms of their operands position by
  position (residual Add, SE Mul), and slice constant operands that have a channel dim;
* Concat concatenates maps, Split and Slice cut them (index mappings with offsets);
* Flatten / Reshape / Squeeze merge the channel axis into a larger one: position j of
  the output axis holds atom `atoms[(j // k) % C]` (a block mapping, `repeat` then `tile`);
* Transpose moves the axis; a depthwise conv copies (or repeats, for a multiplier) it.

Atoms united by a union-find are one *class*: a channel that must be pruned everywhere
at once. Spaces linked through any united atom form a *group*, the unit that is scored
and planned (Torch-Pruning's group, from ONNX semantics). An op the tracer does not
understand *freezes* the atoms of every traced input, with the reason recorded; graph
outputs freeze theirs. Nothing here edits the graph: the result is plain data.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import numpy as np
import onnx_graphsurgeon as gs

from ..channels import ChannelMap, Group, Kind, Member, Role, Shape, Source, Trace, UnionFind
from ..ops import lookup
from ..ops.registry import MAX_OPSET, Freeze, ShapeOf, rule_of
from ..ops.weighted import CHANNEL_ATTRS, WEIGHTED_OPS

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- tracer


@dataclass
class _State:
    uf: UnionFind = field(default_factory=UnionFind)
    maps: dict[str, ChannelMap] = field(default_factory=dict)
    atom_space: list[int] = field(default_factory=list)
    space_atoms: dict[int, np.ndarray] = field(default_factory=dict)
    space_frozen: dict[int, str] = field(default_factory=dict)
    sources: list[Source] = field(default_factory=list)
    frozen: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))
    members: list[tuple[np.ndarray, Member]] = field(default_factory=list)
    blocks: list[tuple[np.ndarray, int]] = field(default_factory=list)
    node_kind: dict[str, Kind] = field(default_factory=dict)

    def new_space(self, n: int, frozen_reason: str | None = None) -> tuple[int, np.ndarray]:
        atoms = self.uf.make(n)
        space = len(self.space_atoms)
        self.space_atoms[space] = atoms
        self.atom_space.extend([space] * n)
        if frozen_reason:
            self.space_frozen[space] = frozen_reason
            self.freeze(atoms, frozen_reason)
        return space, atoms

    def freeze(self, atoms: Iterable[int], reason: str) -> None:
        for a in set(int(x) for x in atoms):
            if reason not in self.frozen[a]:
                self.frozen[a].append(reason)

    def unite(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            self.uf.union(x, y)

    def touch(self, atoms: np.ndarray, node: gs.Node, role: Role) -> None:
        if atoms.size:
            self.members.append((atoms, Member(node.name, node.op, role)))


class Tracer:
    """Walks a topologically sorted gs.Graph once and builds a `Trace`."""

    def __init__(
        self, graph: gs.Graph, shapes: Mapping[str, Shape], exclude: Sequence[str] = (), opset: int = 17
    ) -> None:
        self.graph = graph
        self.opset = opset
        self.shapes = shapes
        self.exclude = tuple(exclude)
        self.s = _State()
    # -- helpers --------------------------------------------------------------

    def shape(self, tensor: gs.Tensor) -> Shape | None:
        if isinstance(tensor, gs.Constant):
            return tuple(np.asarray(tensor.values).shape)
        return self.shapes.get(tensor.name)

    def cmap(self, tensor: gs.Tensor) -> ChannelMap | None:
        return self.s.maps.get(tensor.name) if tensor.name else None

    def traced_inputs(self, node: gs.Node) -> list[tuple[int, ChannelMap]]:
        return [(i, m) for i, t in enumerate(node.inputs) if (m := self.cmap(t)) is not None]

    def traced_with_shape(self, node: gs.Node) -> tuple[ChannelMap, Shape] | None:
        """The first input's map and static shape; None if untraced, frozen if the shape is unknown."""
        x_map = self.cmap(node.inputs[0])
        if x_map is None:
            return None
        shape = self.shape(node.inputs[0])
        if shape is None:
            raise Freeze("unknown rank")
        return x_map, shape

    def set_map(self, tensor: gs.Tensor, cmap: ChannelMap) -> None:
        self.s.maps[tensor.name] = cmap

    def touch(self, atoms: np.ndarray, node: gs.Node, role: Role) -> None:
        self.s.touch(atoms, node, role)

    def unite(self, a: np.ndarray, b: np.ndarray) -> None:
        self.s.unite(a, b)

    def new_space(self, n: int, frozen_reason: str | None = None) -> tuple[int, np.ndarray]:
        return self.s.new_space(n, frozen_reason)

    def new_source(self, node: gs.Node, out: gs.Tensor, axis: int, n: int, weight_axis: int) -> tuple[int, np.ndarray]:
        """A space of `n` fresh atoms: the output channels of `node`, its weight sliced along `weight_axis`."""
        space, atoms = self.s.new_space(n)
        self.s.sources.append(Source(node.name, node.op, node.inputs[1].name, weight_axis, space))
        self.s.touch(atoms, node, Role.OUT)
        self.set_map(out, ChannelMap(axis, atoms))
        return space, atoms

    def add_block(self, atoms: np.ndarray, group: int) -> None:
        """Grouped conv: `atoms` split into `group` contiguous blocks that must keep equal counts."""
        self.s.blocks.append((atoms, group))

    def set_kind(self, node: gs.Node, kind: Kind) -> None:
        self.s.node_kind[node.name] = kind

    def is_graph_output(self, tensor: gs.Tensor) -> bool:
        return tensor in self.graph.outputs

    def freeze_node(self, node: gs.Node, reason: str) -> None:
        """The conservative default: every traced input keeps all its channels."""
        for _, m in self.traced_inputs(node):
            self.s.freeze(m.atoms, f"{node.op} {node.name}: {reason}")
            self.s.touch(m.atoms, node, Role.FROZEN)
        self.s.node_kind.setdefault(node.name, Kind.FROZEN)

    def pass_through(self, node: gs.Node, cmap: ChannelMap, role: Role = Role.PASS) -> None:
        self.s.touch(cmap.atoms, node, role)
        out = node.outputs[0]
        self.set_map(out, cmap)

    # -- driver ---------------------------------------------------------------

    def run(self) -> Trace:
        for node in self.graph.nodes:
            rule = lookup(node.domain, node.op, self.opset)
            if rule is None:
                if self.traced_inputs(node):
                    self.freeze_node(node, "op not understood by the tracer")
                continue
            try:
                rule.trace(self, node)
            except Freeze as stop:
                self.freeze_node(node, str(stop))
                for out in node.outputs:
                    self.s.maps.pop(out.name, None)
        self._couple_shared_weights()
        for out in self.graph.outputs:
            if (m := self.cmap(out)) is not None:
                self.s.freeze(m.atoms, f"graph output {out.name}")
        self._apply_excludes()
        return self._finish()

    def _couple_shared_weights(self) -> None:
        """Nodes that share one weight tensor are pruned alike, so the weight stays shared.

        Weight column j and row i are the same numbers in every user: their input channels are
        united position by position, and so are their output channels (Torch-Pruning's rule for a
        module called twice). Without it each user would get its own slice, and a pruned model
        could hold more parameters than the original. Users whose ops, channel attributes
        (`CHANNEL_ATTRS`) or channel counts differ are frozen instead.
        """
        users: dict[str, list[gs.Node]] = defaultdict(list)
        for node in self.graph.nodes:
            if node.op in WEIGHTED_OPS and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
                users[node.inputs[1].name].append(node)
        for weight, nodes in users.items():
            if len(nodes) < 2:
                continue
            first = nodes[0]
            for other in nodes[1:]:
                pairs = [(self.cmap(first.inputs[0]), self.cmap(other.inputs[0])),
                         (self.cmap(first.outputs[0]), self.cmap(other.outputs[0]))]
                alike = other.op == first.op and all(
                    other.attrs.get(a) == first.attrs.get(a) for a in CHANNEL_ATTRS.get(first.op, ())
                )
                # untraced on both sides (a graph input) is fine: those channels never change
                if alike and all((a is None and b is None) or (a is not None and b is not None and a.size == b.size)
                                 for a, b in pairs):
                    for a, b in pairs:
                        if a is not None and b is not None:
                            self.s.unite(a.atoms, b.atoms)
                    continue
                reason = f"{first.name} and {other.name} share weight {weight} but cannot be pruned alike"
                for a, b in pairs:
                    for m in (a, b):
                        if m is not None:
                            self.s.freeze(m.atoms, reason)

    def _apply_excludes(self) -> None:
        if not self.exclude:
            return
        for node in self.graph.nodes:
            if any(fnmatchcase(node.name, pat) for pat in self.exclude):
                for t in [*node.inputs, *node.outputs]:
                    if (m := self.cmap(t)) is not None:
                        self.s.freeze(m.atoms, f"excluded by --exclude ({node.name})")

    # -- result -------------------------------------------------------------------

    def _finish(self) -> Trace:
        s = self.s
        roots = s.uf.roots()
        n_spaces = len(s.space_atoms)
        space_uf = UnionFind()
        space_uf.make(n_spaces)
        atom_space = np.asarray(s.atom_space, dtype=np.int64)
        for atom, root in enumerate(roots.tolist()):
            space_uf.union(int(atom_space[atom]), int(atom_space[root]))
        space_root = space_uf.roots() if n_spaces else np.zeros(0, dtype=np.int64)

        by_group: dict[int, list[int]] = defaultdict(list)
        for space in range(n_spaces):
            by_group[int(space_root[space])].append(space)

        frozen_roots: dict[int, list[str]] = defaultdict(list)
        for atom, reasons in s.frozen.items():
            bucket = frozen_roots[int(roots[atom])]
            bucket.extend(r for r in reasons if r not in bucket)

        def groups_of(atoms: np.ndarray) -> set[int]:
            return set(space_root[atom_space[atoms]].tolist())

        # a member belongs to every group whose channels it touches (a Concat consumer spans several)
        members_by_group: dict[int, list[Member]] = defaultdict(list)
        for atoms, member in s.members:
            for key in groups_of(atoms):
                members_by_group[key].append(member)
        blocks_by_group: dict[int, list[tuple[np.ndarray, int]]] = defaultdict(list)
        mixed_blocks: dict[int, str] = {}
        for atoms, g in s.blocks:
            keys = groups_of(atoms)
            if len(keys) == 1:
                blocks_by_group[keys.pop()].append((atoms, g))
            else:  # the per-group equal count would have to hold across groups: not expressible here
                for key in keys:
                    mixed_blocks[key] = "a grouped conv mixes channels of several groups"
        node_macs = self._node_macs()
        groups: list[Group] = []
        class_group: dict[int, int] = {}
        for spaces in sorted(by_group.values(), key=lambda sp: min(sp)):
            atoms = np.concatenate([s.space_atoms[sp] for sp in spaces])
            classes = list(dict.fromkeys(int(r) for r in roots[atoms]))
            reasons = list(dict.fromkeys(r for c in classes for r in frozen_roots.get(c, [])))
            frozen = [bool(frozen_roots.get(c)) for c in classes]
            key = int(space_root[spaces[0]])
            members = list(dict.fromkeys(members_by_group.get(key, [])))
            # a group whose only spaces are frozen placeholders has no source to prune
            if all(sp in s.space_frozen for sp in spaces):
                frozen = [True] * len(classes)
            block = 1
            group_blocks = blocks_by_group.get(key, [])
            why = mixed_blocks.get(key, "")
            if group_blocks and not why:
                block, why = _block_constraint(classes, group_blocks, roots)
            if why:
                block = 1
                frozen = [True] * len(classes)
                reasons.append(why)
            index = len(groups)
            for c in classes:
                class_group[c] = index
            macs = sum(node_macs.get(n, 0) for n in dict.fromkeys(m.node for m in members))
            groups.append(
                Group(index, tuple(spaces), tuple(classes), tuple(frozen), tuple(reasons), tuple(members), block, macs)
            )
        return Trace(
            groups=tuple(groups),
            maps=dict(s.maps),
            sources=tuple(s.sources),
            roots=roots,
            class_group=class_group,
            node_kind=dict(s.node_kind),
            space_atoms=dict(s.space_atoms),
            shapes=self.shapes,
            node_macs=node_macs,
        )

    def _node_macs(self) -> dict[str, int]:
        return {n.name: node_macs(n, self.shape) for n in self.graph.nodes}


def _block_constraint(
    classes: Sequence[int], blocks: Sequence[tuple[np.ndarray, int]], roots: np.ndarray
) -> tuple[int, str]:
    """Grouped convs: every constraint must split this group's classes into the same blocks."""
    class_index = {c: i for i, c in enumerate(classes)}
    reference: list[int] | None = None
    count = 1
    for atoms, g in blocks:
        cls = [class_index.get(int(r), -1) for r in roots[atoms]]
        if len(set(cls)) != len(cls) or len(cls) != len(classes) or len(cls) % g:
            return 1, "grouped conv channels are shared unevenly"
        per = len(cls) // g
        block_of = [0] * len(classes)
        for pos, c in enumerate(cls):
            block_of[c] = pos // per
        if reference is None:
            reference, count = block_of, g
        elif reference != block_of:
            return 1, "grouped convs disagree on channel blocks"
    return count, ""


def node_macs(node: gs.Node, shape_of: ShapeOf) -> int:
    """Multiply-accumulates of a node, by its op rule (only weighted ops count; see `ops.weighted`)."""
    # its own domain's rule first (a contrib op), else the default domain's of that name
    rule = rule_of(node) or lookup(None, node.op, MAX_OPSET)
    return 0 if rule is None else rule.macs(node, shape_of)


def trace(graph: gs.Graph, shapes: Mapping[str, Shape], exclude: Sequence[str] = (), opset: int = 17) -> Trace:
    """Trace the coupled channel groups of `graph` (see the module docstring)."""
    return Tracer(graph, shapes, exclude, opset).run()
