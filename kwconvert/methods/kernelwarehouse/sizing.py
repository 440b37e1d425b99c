"""How big each warehouse is: cells, n, attention width and the parameter saver per warehouse
(paper Sec. 3.2-3.4, Table 14), the allocation below b = 1 and the parameter bound.

Each group of :mod:`.grouping` gets a :class:`Layout` (its own budget b', cell shape,
attention reduction, saver); :func:`allocate` moves budget between warehouses below 1
where it buys the most, and :func:`honour_budget` splits or drops warehouses until the
model is within ``max_params_ratio`` of its baseline.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Sequence

from ...plan import LayerPlan, WarehousePlan
from ...formatting import dims
from ...trace import Candidate, LayerGraph
from . import cells
from .grouping import Group, Grouping
from .options import PlanOptions


@dataclass(frozen=True)
class Layout:
    """How one warehouse is sized: its own budget b', cell, attention width and saver.

    The paper gives every warehouse the model's b, cells of the GCDs (halved below 1),
    attention reduction 1/16 and, at b < 1, the parameter saver where attention dominates.
    Below 1 the allocator (:func:`_allocate`) may give a warehouse another layout, and the
    ``warehouses`` option pins any field.  ``cell_ratio`` ``(out, in)`` are fractions of the
    GCDs (:func:`.cells.cell_shape`); None is the paper's rule.
    """
    budget: float
    cell_ratio: tuple[float, float] | None = None
    reduction: float = 1 / 16
    saver: bool = False


#: A converted head's cell spans every output and 1/40 of the inputs, as the reference's
#: MobileNetV2 1/2x classifier (cells 1000 x 32 of its 1000 x 1280 kernel: 40 mixtures).
#: A head warehouse has one layer, so the GCDs are the kernel itself and the paper's rule
#: would cut it into 4 cells: too few mixtures to be dynamic.
HEAD_CELL_RATIO = (1.0, 1 / 40)


@dataclass(frozen=True)
class Sizing:
    """Cells, n and attention of a warehouse under a layout, from :mod:`.cells` (paper Sec. 3)."""
    options: PlanOptions
    norm: str

    def warehouse(self, name: str, members: Sequence[Candidate], layout: Layout) -> WarehousePlan:
        cell, counts, n, basis_ratio = self._layout(members, layout)
        layers, offset = [], 0
        for cand, m in zip(members, counts):
            layers.append(LayerPlan(name=cand.name, kind=cand.kind, weight_shape=tuple(cand.weight_shape),
                                    in_channels=cand.in_channels, groups=cand.groups, cells=m,
                                    offset=offset, hidden=self._hidden(cand, layout), rows=cand.rows,
                                    positions=cand.positions))
            offset += cells.cells_handed_out(m, layout.budget)
        return WarehousePlan(name=name, layers=tuple(layers), cell=cell, m_t=sum(counts), n=n,
                             budget=layout.budget, attention_norm=self.norm, basis_ratio=basis_ratio,
                             warehouse_params=n * math.prod(cell),
                             attention_params=self._attention(members, counts, n, layout, basis_ratio))

    def cost(self, members: Sequence[Candidate], layout: Layout) -> int:
        """Parameters a group adds over the static layers it replaces (may be negative).

        The arithmetic of :meth:`warehouse` without building the plan: the allocator and
        the budget guard evaluate it for every choice they consider.
        """
        cell, counts, n, basis_ratio = self._layout(members, layout)
        return (n * math.prod(cell) + self._attention(members, counts, n, layout, basis_ratio)
                - sum(c.weight_numel for c in members))

    def _layout(self, members: Sequence[Candidate], layout: Layout):
        """``(cell, m per layer, n, basis_ratio)``; dynamic_conv cells are whole kernels."""
        shapes = [c.weight_shape for c in members]
        if self.options.mode == "dynamic_conv":
            cell = tuple(shapes[0])
        else:
            cell = cells.cell_shape(shapes, layout.budget, layout.cell_ratio)
        counts = [cells.cells_in(shape, cell) for shape in shapes]
        basis_ratio = self.options.basis_ratio if layout.saver and layout.budget < 1 else None
        return cell, counts, cells.warehouse_size(sum(counts), layout.budget), basis_ratio

    def _hidden(self, cand: Candidate, layout: Layout) -> int:
        return cells.hidden_size(cand.in_channels, layout.reduction, self.options.min_hidden)

    def _attention(self, members: Sequence[Candidate], counts: Sequence[int], n: int, layout: Layout,
                   basis_ratio: float | None) -> int:
        return sum(cells.attention_params(cand.in_channels, self._hidden(cand, layout), m, n, norm=self.norm,
                                          budget=layout.budget, basis_ratio=basis_ratio)
                   for cand, m in zip(members, counts))


def _use_saver(sizing: Sizing, groups: list[Group], budget: float) -> bool:
    """Spec rule: the saver is on when b < 1 and attention > half the warehouse parameters."""
    options = sizing.options
    if budget >= 1 or options.param_saver is False or options.mode == "dynamic_conv":
        return False
    if options.param_saver is True:
        return True
    planned = [sizing.warehouse(g.name, g.members, g.layout) for g in groups]
    return sum(w.attention_params for w in planned) > 0.5 * sum(w.warehouse_params for w in planned)


def layouts(grouping: Grouping, budget: float, sizing: Sizing, notes: list[str]) -> list[Group]:
    """Every group's layout: the paper's, then the ``warehouses`` option's pins.

    Heads (``head='warehouse'``) join as warehouses of their own with narrow cells
    (:data:`HEAD_CELL_RATIO`); a warehouse pinned ``static`` leaves its layers plain.
    """
    options = sizing.options
    paper = Layout(budget=budget, reduction=options.reduction)
    groups = [dataclasses.replace(g, layout=paper) for g in grouping.groups]
    if options.head == "warehouse":
        groups += [Group(f"head.{cand.kind}", [cand], _head_layout(budget, options)) for cand in grouping.heads]
        for cand in grouping.heads:
            del grouping.plain[cand.name]
    if _use_saver(sizing, groups, budget):
        groups = [dataclasses.replace(g, layout=dataclasses.replace(g.layout, saver=True)) for g in groups]
        notes.append(f"parameter saver on (basis ratio {options.basis_ratio:g}): at b < 1 the "
                     "attention would otherwise hold more than half as many parameters as the warehouses")
    pinned = []
    for group in groups:
        pins = options.pins(group.name)
        if pins.get("static"):
            grouping.plain.update((c.name, "kept static by option warehouses") for c in group.members)
        else:
            group.layout = _pinned(group.layout, pins)
            pinned.append(group)
    return pinned


def _head_layout(budget: float, options: PlanOptions) -> Layout:
    return Layout(budget=budget, cell_ratio=HEAD_CELL_RATIO, reduction=options.reduction)


def _pinned(layout: Layout, pins: dict[str, Any]) -> Layout:
    changes = {"budget": pins.get("budget"), "reduction": pins.get("reduction"), "saver": pins.get("param_saver"),
               "cell_ratio": tuple(pins["cell"]) if "cell" in pins else None}
    return dataclasses.replace(layout, **{k: v for k, v in changes.items() if v is not None})


# =======================================================================================
# Allocation below 1 and the budget guard
# =======================================================================================
def allocation_target(budget: float) -> float:
    """Converted / baseline parameters the allocator works down to below 1.

    ``b + 1/4`` up to b = 1/2, then halfway from b to 1 (0.875 at 3/4).  The budget scales
    the warehouses' cells; a converted model also holds attention and the layers it keeps
    static, so b itself is out of reach.  The target is what the paper's own b < 1 models
    reach (ResNet18 1/4x 0.35, 1/2x 0.64, ResNet50 1/2x 0.69, the authors' MobileNetV2
    1/2x 0.76, ConvNeXt-T 3/4x 0.86): the allocator leaves those layouts as they are.
    """
    return min(budget + 0.25, (1 + budget) / 2)


def allocate(graph: LayerGraph, groups: list[Group], heads: list[Candidate], plain: dict[str, str],
              sizing: Sizing, budget: float, notes: list[str]) -> list[Group]:
    """Spend a budget below 1 where the parameters are.

    The paper's layout at b everywhere leaves mobile models near 1x: attention grows with
    m_t squared and their classifiers (a third of MobileNetV2) stay static.  While the model
    holds more than :func:`allocation_target` of its baseline parameters, apply the change
    that saves the most (:meth:`_Part.moves`): a warehouse at b' = 1, its GCD cells
    one-to-one, where its attention at b costs more than the smaller cells save (the
    reference's MobileNetV2 1/2x keeps its small early warehouses at ratio 1); a head in a
    warehouse of its own; half a warehouse's attention width, down to a quarter of
    ``reduction`` (the reference's MobileNetV2 1/2x uses 1/32); its parameter saver; a
    split in two (:func:`_best_split`); cells of its whole GCDs (a quarter of the
    mixtures, a sixteenth of the attention).  Each change is noted per warehouse.

    No layer is kept static here, no b' leaves [b, 1], and the ``warehouses`` option's pins
    are never changed.  The paper's b < 1 ResNets are under the target already and keep
    their layouts.
    """
    options = sizing.options
    parts = [_Part(g.name, g.members, g.layout, sizing, frozenset(options.pins(g.name))) for g in groups]
    changes: dict[str, list[str]] = collections.defaultdict(list)
    waiting = []  # heads the allocator may convert, as their pins would have them
    for cand in heads if options.head == "auto" else []:
        pins = options.pins(f"head.{cand.kind}")
        if cand.name in plain and not pins.get("static"):
            waiting.append(_Part(f"head.{cand.kind}", [cand], _pinned(_head_layout(budget, options), pins), sizing,
                                 frozenset(pins), converted=False))
    limit = allocation_target(budget) * graph.params_baseline
    while graph.params_baseline + sum(p.cost for p in parts) > limit:
        moves = [(move, part) for part in parts + waiting for move in part.moves]
        if not moves:
            break
        (saving, label, replacement), part = max(moves, key=lambda mp: mp[0][0])
        if saving <= 0:
            break
        if part in waiting:
            waiting.remove(part)
            del plain[part.members[0].name]
            parts.extend(replacement)
        else:
            index = parts.index(part)
            parts[index:index + 1] = replacement
        changes[part.name].append(f"{label} (saves {saving:,})")
    for name, done in changes.items():
        notes.append(f"allocator: {name}: " + "; ".join(done))
    return [Group(p.name, p.members, p.layout) for p in parts]


def honour_budget(graph: LayerGraph, groups: list[Group], plain: dict[str, str], sizing: Sizing,
                   limit: float, notes: list[str]) -> list[Group]:
    """Budget guard: keep the converted model under ``limit`` parameters.

    The attention of a warehouse grows with m_t squared (fc2 is hidden x m x (n + 1) per
    layer and n = b * m_t), so a warehouse whose GCDs collapse (MobileNetV3's gcd 8,
    DenseNet's one "pre" stage, RegNet's 208 -> 440 handover) explodes, and a layer whose
    cells are tiny against its input width (depthwise convs at b < 1) costs more than it
    holds.  Only while the model is over the limit (so plans that fit, such as the paper's
    four models at Table 14's budgets, are never touched), the guard applies:

    1. the split that saves the most parameters: one warehouse in two, by execution order
       or by channel pattern (:func:`_best_split`); repeat;
    2. when no split saves anything, keep static the layer whose conversion costs the
       most (reason "kept static to honour the budget"); repeat.

    Splits come first because they keep every layer dynamic: the paper finds sharing
    within each layer nearly as good as within each stage (ResNet18 KW 1x: 74.34 vs
    74.77 top-1), and a static layer loses the method altogether.
    """
    allowed = limit - graph.params_baseline  # total cost the warehouses may add
    parts = [_Part(g.name, list(g.members), g.layout, sizing) for g in groups]
    splits: dict[str, int] = {}
    kept_static = []
    while sum(p.cost for p in parts) > allowed:
        index, part = max(enumerate(parts), key=lambda ip: (ip[1].split_saving, -ip[0]))
        if part.split_saving > 0:
            _, first, second = part.split
            parts[index:index + 1] = [part.with_members(first), part.with_members(second)]
            splits[part.name] = splits.get(part.name, 1) + 1
        else:
            index, part = max(enumerate(parts), key=lambda ip: (ip[1].drop[0], -ip[0]))
            if part.drop[0] <= 0:
                break
            _, drop = part.drop
            kept_static.append(part.members[drop].name)
            plain[part.members[drop].name] = "kept static to honour the budget"
            rest = part.members[:drop] + part.members[drop + 1:]
            parts[index:index + 1] = [part.with_members(rest)] if rest else []
    total = graph.params_baseline + sum(p.cost for p in parts)
    if splits:
        notes.append("budget guard: split " + ", ".join(f"{name} into {k}" for name, k in splits.items())
                     + " to bound the attention size")
    if kept_static:
        notes.append(f"budget guard: kept {len(kept_static)} layer(s) static to honour the budget")
    if total > limit:
        notes.append(f"budget guard: the plan holds {total / graph.params_baseline:.2f}x the baseline "
                     f"parameters, over the limit of {limit / graph.params_baseline:.2f}x; no remedy was left")
    return [Group(p.name, p.members, p.layout) for p in parts]


class _Part:
    """A warehouse under the allocator or the guard: its cost and the changes it allows.

    A head the allocator has not converted yet is a part with ``converted=False``: it costs
    nothing, and its one move converts it.
    """

    def __init__(self, name: str, members: list[Candidate], layout: Layout, sizing: Sizing,
                 pinned: frozenset[str] = frozenset(), converted: bool = True):
        self.name, self.members, self.layout, self.sizing = name, list(members), layout, sizing
        self.pinned, self.converted = pinned, converted
        self.cost = sizing.cost(members, layout) if converted else 0

    def replaced(self, layout: Layout) -> "_Part":
        return _Part(self.name, self.members, layout, self.sizing, self.pinned)

    def with_members(self, members: list[Candidate]) -> "_Part":
        return _Part(self.name, members, self.layout, self.sizing, self.pinned)

    @functools.cached_property
    def moves(self) -> list[tuple[int, str, list["_Part"]]]:
        """The allocator's changes to this part: ``(saving, label, replacement parts)``.

        Cached: a part never changes (the allocator replaces it), so each loop of the
        allocator only sizes the moves of the parts the last change made."""
        if not self.converted:
            head = self.replaced(self.layout)
            return [(-head.cost, f"{self.members[0].name} converted, cells {dims(head.cell)}", [head])]
        layout, options, found = self.layout, self.sizing.options, []
        if "budget" not in self.pinned and layout.budget < 1:
            found.append(self._relayout("b' = 1", budget=1.0, saver=False))
        if "reduction" not in self.pinned and layout.reduction > options.reduction / 4 * (1 + 1e-9):
            found.append(self._relayout(f"attention reduction 1/{round(2 / layout.reduction)}",
                                        reduction=layout.reduction / 2))
        if "param_saver" not in self.pinned and layout.budget < 1 and not layout.saver \
                and options.param_saver is not False:
            found.append(self._relayout("parameter saver on", saver=True))
        if "cell" not in self.pinned and layout.budget < 1 and layout.cell_ratio is None \
                and options.mode != "dynamic_conv":
            found.append(self._relayout("cells of the whole GCDs", cell_ratio=(1.0, 1.0)))
        if self.split is not None:
            saving, first, second = self.split
            found.append((saving, f"split before {second[0].name}" if first[-1].order < second[0].order
                          else f"split off {second[0].name} and {len(second) - 1} more",
                          [self.with_members(first), self.with_members(second)]))
        return found

    def _relayout(self, label: str, **change: Any) -> tuple[int, str, list["_Part"]]:
        other = self.replaced(dataclasses.replace(self.layout, **change))
        return self.cost - other.cost, label, [other]

    @property
    def cell(self) -> tuple[int, ...]:
        return self.sizing._layout(self.members, self.layout)[0]

    @functools.cached_property
    def split(self) -> tuple[int, list[Candidate], list[Candidate]] | None:
        """``(saving, first, second)`` of the best two-way split, None for one layer."""
        if len(self.members) < 2:
            return None
        first, second, costs = _best_split(self.sizing, self.members, self.layout)
        return self.cost - sum(costs), first, second

    @functools.cached_property
    def drop(self) -> tuple[int, int]:
        """``(saving, index)`` of keeping the costliest layer static."""
        members = self.members
        savings = [self.cost - (self.sizing.cost(members[:j] + members[j + 1:], self.layout)
                                if len(members) > 1 else 0) for j in range(len(members))]
        best = max(range(len(members)), key=lambda j: (savings[j], -j))
        return savings[best], best

    @property
    def split_saving(self) -> int:
        return self.split[0] if self.split is not None else 0


def _best_split(sizing: Sizing, members: list[Candidate], layout: Layout):
    """The two-way split of ``members`` whose parts cost the least: ``(left, right, costs)``.

    Candidates are every cut in execution order (fewer blocks per warehouse) and every
    split by channel pattern (one kernel size, output width or input width per group
    against the rest), which lifts the GCDs a few odd layers had collapsed.
    """
    best = None
    for left, right in _two_way_splits(members):
        costs = (sizing.cost(left, layout), sizing.cost(right, layout))
        if best is None or sum(costs) < sum(best[2]):
            best = (left, right, costs)
    return best


#: The guard tries at most this many cuts and channel patterns per split, so that a
#: warehouse of hundreds of layers still splits in milliseconds.
MAX_SPLITS_TRIED = 64


def _two_way_splits(members: list[Candidate]):
    count = len(members)
    cuts = range(1, count) if count <= MAX_SPLITS_TRIED else sorted(
        {round(i * count / MAX_SPLITS_TRIED) for i in range(1, MAX_SPLITS_TRIED)} - {0, count})
    for cut in cuts:
        yield members[:cut], members[cut:]
    for pattern in (lambda c: c.kernel_size, lambda c: c.out_channels, lambda c: c.weight_shape[1]):
        values = collections.Counter(pattern(c) for c in members)
        if len(values) > 1:
            for value, _ in values.most_common(MAX_SPLITS_TRIED // 4):
                yield ([c for c in members if pattern(c) == value],
                       [c for c in members if pattern(c) != value])


def renumber(groups: list[Group]) -> list[Group]:
    """Groups ordered by first member; a split warehouse's parts are named NAME-1, NAME-2..."""
    counts = collections.Counter(group.name for group in groups)
    seen: dict[str, int] = collections.defaultdict(int)
    numbered = []
    for group in sorted(groups, key=lambda g: g.members[0].order):
        name = group.name
        if counts[name] > 1:
            seen[name] += 1
            name = f"{name}-{seen[name]}"
        numbered.append(Group(name, list(group.members), group.layout))
    return numbered
