"""Consistency of a plan: the checks that need no model (paper Sec. 3.3's arithmetic).

Plans are data a user may edit by hand, so every path that takes one runs these first.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .. import methods
from ..methods.kernelwarehouse import cells
from .budget import check_budget
from ..formatting import dims

if TYPE_CHECKING:
    from .schema import LayerPlan, Plan, WarehousePlan


_KERNEL_RANK = {"conv1d": 3, "conv2d": 4, "conv3d": 5, "linear": 2}
_ATTENTION_NORMS = ("batchnorm", "layernorm")


def check_consistent(plan: Plan) -> None:
    """Refuse a plan whose numbers contradict each other, naming the warehouse and field.

    Plans are data a user may edit by hand.  :meth:`Plan.from_dict` runs this as it reads
    one, so an edited plan is refused before anything prints it, and
    :func:`kwconvert.rewrite.check_plan_fits` runs it before applying one (a plan edited
    in Python), and :func:`plan` on what it made.  These are the checks that need no model:
    each layer's m is the number of cells tiling its kernel, offsets follow the one-to-one
    walk (paper Sec. 3.3; :func:`kwconvert.methods.kernelwarehouse.cells.cells_handed_out`), m_t is the sum of m,
    n holds the walk and is ``max(floor(b * m_t), 1)``, and the parameter counts follow
    from them.  Whether the plan describes a given model is ``check_plan_fits``'s part.
    """
    try:
        check_budget(plan.budget)
    except ValueError as err:
        raise ValueError(f"plan: {err}") from None
    try:
        methods.check_method(plan.method)
    except ValueError as err:
        raise ValueError(f"plan: {err}") from None
    plain = {static.layer for static in plan.plain}
    _check_parent_errors(plan)
    if plan.method in methods.PER_LAYER_METHODS:
        _check_dynamic_layers(plan, plain)
        return
    if plan.layers:
        raise ValueError(f"plan: a {plan.method} plan holds warehouses, not 'layers' ({plan.layers[0].name})")
    mode = plan.options.get("mode", "kernelwarehouse") if isinstance(plan.options, dict) else None
    if mode not in methods.WAREHOUSE_METHODS:
        raise ValueError(f"plan: options.mode must be one of {', '.join(methods.WAREHOUSE_METHODS)}, got {mode!r}")
    warehouse_names: set[str] = set()
    warehouse_of: dict[str, str] = {}
    for warehouse in plan.warehouses:
        if warehouse.name in warehouse_names:
            raise ValueError(f"plan warehouse {warehouse.name}: two warehouses have that name")
        warehouse_names.add(warehouse.name)
        _check_warehouse(warehouse, mode)
        for name in warehouse.layer_names:
            where = f"plan warehouse {warehouse.name}, layer {name}"
            if name in warehouse_of:
                raise ValueError(f"{where}: the layer is planned twice (also in warehouse {warehouse_of[name]})")
            if name in plain:
                raise ValueError(f"{where}: the layer is also listed as plain")
            warehouse_of[name] = warehouse.name


def _check_parent_errors(plan: Plan) -> None:
    """Only a KernelDNA parent has a kernel fit error among the plain layers, and it is a
    relative error (>= 0); ``options.fit_parent``, where present, is a boolean."""
    parents = {layer.parent for layer in plan.layers if layer.parent is not None}
    for static in plan.plain:
        if static.fit_error is None:
            continue
        if static.layer not in parents:
            raise ValueError(f"plan plain layer {static.layer}: only a KernelDNA parent has a fit_error")
        if not static.fit_error >= 0:  # NaN fails too
            raise ValueError(f"plan plain layer {static.layer}: fit_error must be >= 0, got {static.fit_error}")
    fit_parent = plan.options.get("fit_parent", False) if isinstance(plan.options, dict) else False
    if not isinstance(fit_parent, bool):
        raise ValueError(f"plan: options.fit_parent must be true or false, got {fit_parent!r}")


def _check_dynamic_layers(plan: Plan, plain: set[str]) -> None:
    """A per-layer method's plan: no warehouses; each layer a convolution whose kernels are
    the plan's (``budget``) and whose parameters follow from its sizes."""
    if plan.warehouses:
        raise ValueError(f"plan: a {plan.method} plan lists layers, not warehouses ({plan.warehouses[0].name})")
    seen: set[str] = set()
    for layer in plan.layers:
        where = f"plan layer {layer.name}"
        if layer.name in seen or layer.name in plain:
            raise ValueError(f"{where}: the layer is planned twice (or also listed as plain)")
        seen.add(layer.name)
        rank = _KERNEL_RANK.get(layer.kind)
        if rank is None or layer.kind == "linear":
            raise ValueError(f"{where}: kind is {layer.kind!r}; {plan.method} converts conv1d, conv2d and conv3d")
        if len(layer.weight_shape) != rank or min(layer.weight_shape) < 1:
            raise ValueError(f"{where}: weight_shape {list(layer.weight_shape)} is not a {layer.kind} kernel "
                             f"({rank} positive sizes)")
        for name in ("in_channels", "groups", "kernels", "hidden") + (
                ("positions",) if layer.positions is not None else ()):
            if getattr(layer, name) < 1:
                raise ValueError(f"{where}: {name} must be positive, got {getattr(layer, name)}")
        if layer.in_channels != layer.weight_shape[1] * layer.groups:
            raise ValueError(f"{where}: in_channels {layer.in_channels} is not groups {layer.groups} x "
                             f"{layer.weight_shape[1]} (the kernel's input channels)")
        if layer.kernels != plan.budget:
            raise ValueError(f"{where}: kernels is {layer.kernels}, the plan's is {plan.budget:g}")
        derived = plan.method in methods.DERIVED_METHODS
        if derived != (layer.parent is not None):
            raise ValueError(f"{where}: " + (f"a {plan.method} child needs a parent" if derived else
                                             f"a {plan.method} layer has no parent"))
        if derived and layer.parent not in plain:
            raise ValueError(f"{where}: its parent {layer.parent} must stay a static layer of the plan")
        expected = methods.layer_params(plan.method, layer)
        if layer.params != expected:
            raise ValueError(f"{where}: params is {layer.params}, its sizes give {expected}")


def _check_warehouse(warehouse: WarehousePlan, mode: str) -> None:
    where = f"plan warehouse {warehouse.name}"
    if not warehouse.layers:
        raise ValueError(f"{where}: it has no layers")
    try:
        check_budget(warehouse.budget)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    if warehouse.attention_norm not in _ATTENTION_NORMS:
        raise ValueError(f"{where}: attention norm must be one of {', '.join(_ATTENTION_NORMS)}, "
                         f"got {warehouse.attention_norm!r}")
    if warehouse.basis_ratio is not None and not 0 < warehouse.basis_ratio <= 1:
        raise ValueError(f"{where}: basis_ratio must be in (0, 1] or null, got {warehouse.basis_ratio}")
    handed_out = 0
    for layer in warehouse.layers:
        _check_layer(layer, warehouse, f"{where}, layer {layer.name}", handed_out)
        handed_out += cells.cells_handed_out(layer.cells, warehouse.budget)
    m_t = sum(layer.cells for layer in warehouse.layers)
    if m_t != warehouse.m_t:
        raise ValueError(f"{where}: m_t is {warehouse.m_t}, its layers' m sum to {m_t}")
    if warehouse.n < 1 or handed_out > warehouse.n:
        raise ValueError(f"{where}: n is {warehouse.n}, too few for the {handed_out} cells its layers start on")
    n = cells.warehouse_size(m_t, warehouse.budget)
    if mode == "kernelwarehouse" and n != warehouse.n:
        raise ValueError(f"{where}: n is {warehouse.n}, budget {warehouse.budget:g} x m_t {m_t} gives {n}")
    if warehouse.warehouse_params != warehouse.n * math.prod(warehouse.cell):
        raise ValueError(f"{where}: params.warehouse is {warehouse.warehouse_params}, n {warehouse.n} cells "
                         f"of {dims(warehouse.cell)} hold {warehouse.n * math.prod(warehouse.cell)}")
    attention = sum(cells.attention_params(layer.in_channels, layer.hidden, layer.cells, warehouse.n,
                                           norm=warehouse.attention_norm, budget=warehouse.budget,
                                           basis_ratio=warehouse.basis_ratio) for layer in warehouse.layers)
    if warehouse.attention_params != attention:
        raise ValueError(f"{where}: params.attention is {warehouse.attention_params}, its layers' attention "
                         f"holds {attention}")


def _check_layer(layer: LayerPlan, warehouse: WarehousePlan, where: str, handed_out: int) -> None:
    """One layer's kind, kernel, sizes, rows, m and offset (``handed_out``: the walk so far)."""
    rank = _KERNEL_RANK.get(layer.kind)
    if rank is None:
        raise ValueError(f"{where}: kind is {layer.kind!r}, not one of {', '.join(cells.KINDS)}")
    if len(layer.weight_shape) != rank or min(layer.weight_shape) < 1:
        raise ValueError(f"{where}: weight_shape {list(layer.weight_shape)} is not a {layer.kind} kernel "
                         f"({rank} positive sizes)")
    for name in ("in_channels", "groups", "hidden") + (("positions",) if layer.positions is not None else ()):
        if getattr(layer, name) < 1:
            raise ValueError(f"{where}: {name} must be positive, got {getattr(layer, name)}")
    if layer.rows is not None:
        start, stop = layer.rows
        if not 0 <= start < stop or stop - start != layer.weight_shape[0]:
            raise ValueError(f"{where}: rows {start}:{stop} do not match the {layer.weight_shape[0]} output "
                             f"rows of weight_shape {dims(layer.weight_shape)}")
    try:
        count = cells.cells_in(layer.weight_shape, warehouse.cell)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    if count != layer.cells:
        raise ValueError(f"{where}: m is {layer.cells} but cell {dims(warehouse.cell)} tiles the kernel in "
                         f"{count} (kernel {dims(layer.weight_shape)})")
    if layer.offset != handed_out:
        raise ValueError(f"{where}: offset is {layer.offset}, the one-to-one walk gives {handed_out}")

