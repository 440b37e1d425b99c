"""What a planned model costs to run, known before converting (per sample, traced input size).

A converted layer does three things per sample (paper Sec. 3.2): its attention computes
the mixture weights (:func:`kwconvert.methods.kernelwarehouse.cells.attention_macs`), the assembly mixes its m
kernel cells from the warehouse's n cells (``m x n x cell`` multiply-adds), and the
convolution runs with the assembled kernel, at the static layer's cost.  Each converted
layer reads its whole warehouse once per forward: on a small batch those bytes, not the
multiply-adds, bound the speed (resnet50 at b = 1 reads about a gigabyte per forward).

The ratio of the converted model's multiply-adds to the original's is the floor of its
speed ratio on hardware that runs both at the same efficiency.  The planner stores what
these need (each layer's output positions, the original's multiply-adds); this module
only does the arithmetic, so the plan's tables, its JSON and the tests agree.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Iterable

from .methods.kernelwarehouse import cells
from .methods.odconv.layers import Heads

if TYPE_CHECKING:  # plan imports this module; the types are only read
    from .plan import DynamicLayerPlan, LayerPlan, Plan, WarehousePlan
    from .trace import LayerGraph

#: Bytes of one warehouse entry: the counts assume float32 storage.
FLOAT32_BYTES = 4


@dataclass(frozen=True)
class Cost:
    """Parameters added, multiply-adds per sample, and warehouse bytes read per forward.

    ``conv_macs`` is None when a layer's output size is unknown (a plan saved before
    kwconvert recorded it); the other counts need no input size.
    """
    params: int
    conv_macs: int | None
    assembly_macs: int
    attention_macs: int
    warehouse_bytes: int

    def __add__(self, other: "Cost") -> "Cost":
        conv = None if self.conv_macs is None or other.conv_macs is None else self.conv_macs + other.conv_macs
        return Cost(self.params + other.params, conv, self.assembly_macs + other.assembly_macs,
                    self.attention_macs + other.attention_macs, self.warehouse_bytes + other.warehouse_bytes)

    @property
    def added_macs(self) -> int:
        """What KernelWarehouse adds to the convolutions: assembly and attention."""
        return self.assembly_macs + self.attention_macs

    def to_dict(self) -> dict[str, int | None]:
        return asdict(self)


NOTHING = Cost(0, 0, 0, 0, 0)


def layer_cost(layer: "LayerPlan", warehouse: "WarehousePlan") -> Cost:
    """One converted layer's cost; ``params`` is its attention's (the cells are the warehouse's)."""
    cell = math.prod(warehouse.cell)
    positions = layer.positions
    conv = None if positions is None else math.prod(layer.weight_shape) * positions
    attention = cells.attention_macs(layer.in_channels, layer.hidden, layer.cells, warehouse.n,
                                     budget=warehouse.budget, basis_ratio=warehouse.basis_ratio)
    params = cells.attention_params(layer.in_channels, layer.hidden, layer.cells, warehouse.n,
                                    norm=warehouse.attention_norm, budget=warehouse.budget,
                                    basis_ratio=warehouse.basis_ratio)
    return Cost(params, conv, layer.cells * warehouse.n * cell, attention,
                warehouse.n * cell * FLOAT32_BYTES)


def warehouse_cost(warehouse: "WarehousePlan") -> Cost:
    """A warehouse's cells plus its layers' costs."""
    cost = total(layer_cost(layer, warehouse) for layer in warehouse.layers)
    return Cost(cost.params + warehouse.warehouse_params, cost.conv_macs, cost.assembly_macs,
                cost.attention_macs, cost.warehouse_bytes)


def total(costs: Iterable[Cost]) -> Cost:
    return sum(costs, NOTHING)


def dynamic_layer_cost(layer: "DynamicLayerPlan") -> Cost:
    """One ODConv layer's cost: its kernels' mixture per sample (n x kernel, and the
    spatial scale), its attention's fc and heads, and its n kernels read per forward."""
    kernel = math.prod(layer.weight_shape)
    points = math.prod(layer.weight_shape[2:])
    heads = Heads.of(layer.in_channels, layer.weight_shape[0], layer.groups, points, layer.kernels)
    assembly = (layer.kernels * kernel if heads.kernel else 0) + (kernel if heads.spatial else 0)
    outputs = layer.in_channels + (layer.weight_shape[0] if heads.filter else 0) + (
        points if heads.spatial else 0) + (layer.kernels if heads.kernel else 0)
    conv = None if layer.positions is None else kernel * layer.positions
    return Cost(layer.params, conv, assembly, layer.hidden * (layer.in_channels + outputs),
                layer.kernels * kernel * FLOAT32_BYTES)


def derived_layer_cost(layer: "DynamicLayerPlan") -> Cost:
    """One KernelDNA child's cost: its convolution, its gate's two products, and the parent's
    kernel read once per forward (the child's kernel is built once per batch, not per sample)."""
    kernel = math.prod(layer.weight_shape)
    conv = None if layer.positions is None else kernel * layer.positions
    return Cost(layer.params, conv, 0, 2 * layer.in_channels * layer.hidden, kernel * FLOAT32_BYTES)


def per_layer_cost(layer: "DynamicLayerPlan") -> Cost:
    """A per-layer method's layer: a KernelDNA child, or an ODConv layer."""
    return derived_layer_cost(layer) if layer.parent is not None else dynamic_layer_cost(layer)


def plan_cost(plan: "Plan") -> Cost:
    return total(warehouse_cost(w) for w in plan.warehouses) + total(per_layer_cost(l) for l in plan.layers)


def macs_ratio(plan: "Plan") -> float | None:
    """The converted model's multiply-adds per sample over the original's (None if unknown)."""
    if not plan.baseline_macs:
        return None
    return (plan.baseline_macs + plan_cost(plan).added_macs) / plan.baseline_macs


def baseline_macs(graph: LayerGraph) -> int | None:
    """The traced model's Conv/Linear multiply-adds per sample (None if one output went unseen)."""
    macs = [cand.macs for cand in graph.candidates]
    return None if None in macs else sum(macs)
