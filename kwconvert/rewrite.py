"""Rewriter: model + Plan -> converted model, swapping layers in place.

Like PEFT's tuners, model-level code only finds the planned layers by qualified name and
swaps them (``get_submodule`` on the parent, then ``setattr``): the model keeps its own
class, forward, buffers and every other module.  The layers of a warehouse all register
the same ``Warehouse`` as a submodule (tied weights), so the cells move, train and save
with any part of the model that holds one of its layers; ``parameters()`` yields them once.

Three layers are not swapped one for one (the plan says which): a fused qkv whose value
rows alone are converted becomes a ``PartlyDynamicLinear``, the ``nn.MultiheadAttention``
modules the plan lists are first unpacked into four Linear layers (:mod:`kwconvert.vit`),
and timm's 'SAME'-padded or weight-standardised convolutions are converted from the
kernel they convolve with, inside ``SamePadded`` when they pad (:mod:`kwconvert.compat`).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Iterable

import torch
from torch import nn

from . import calibrate, compat, methods
from . import cells as kw_cells
from .layers import HOLDABLE_BETA_L1, KWConv1d, KWConv2d, KWConv3d, KWLinear, Warehouse, kernel_to_blocks
from .methods.kerneldna.fitting import fit_family, relative_error
from .methods.kerneldna.layers import FRESH_GATE, KDNA_CLASS
from .methods.odconv.layers import OD_CLASS, START_TEMPERATURE
from .plan import DynamicLayerPlan, LayerPlan, Plan, WarehousePlan, check_consistent, plan as make_plan
from .vit import PartlyDynamicLinear, linear_rows, unpack_attention, unpacked_attention

#: Where the converted model keeps its plan.
PLAN_ATTR = "_kwconvert_plan"

_KW_CLASS = {"conv1d": KWConv1d, "conv2d": KWConv2d, "conv3d": KWConv3d, "linear": KWLinear}
_STATIC_CLASS = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d, "linear": nn.Linear}
INIT_MODES = ("preserve", "random", "none")


def convert(model: nn.Module, budget_or_plan: float | str | Plan | None = None, *, init: str = "preserve",
            example_inputs=None, inplace: bool = True, calibration=None, **plan_options) -> nn.Module:
    """Convert ``model`` to KernelWarehouse following a Plan (or planning one for a budget;
    ``method="odconv"`` / ``"kerneldna"`` with their options plan another method, see
    :func:`kwconvert.plan`).

    ``init="preserve"`` (default) builds the cells from the model's own kernels so that a
    trained model keeps what it learned (paper Sec. 3.3's one-to-one initialisation makes
    this exact for b >= 1 at tau = 1); ``init="random"`` is the paper's from-scratch
    initialisation; ``init="none"`` leaves the cells as allocated and keeps the plan's
    recorded fit errors, for loading saved weights right after.  ``inplace=False`` converts a deep copy and leaves ``model`` untouched.
    Every new tensor is made on the model's device and dtype.  A model on the ``meta``
    device has shapes but no values: it converts shape for shape, nothing is fitted, and
    the plan's ``init_error`` is left unknown (None).

    ``calibration`` (inputs of the model: one batch, or an iterable of batches) fits the
    cells of every warehouse below b = 1 to the layers' outputs on those inputs rather than
    to their kernels (:mod:`kwconvert.calibrate`); the plan's ``output_error`` reports the
    fit.  A few hundred training images are enough; it needs ``init="preserve"``.
    """
    if init not in INIT_MODES:
        raise ValueError(f"init must be one of {', '.join(INIT_MODES)}, got '{init}'")
    if calibration is not None and init != "preserve":
        raise ValueError(f"calibration fits the cells to the model's outputs: it needs init='preserve', got '{init}'")
    if isinstance(budget_or_plan, Plan):
        if plan_options:
            raise ValueError("plan options cannot be combined with a ready Plan: "
                             f"got {', '.join(sorted(plan_options))}")
        plan = budget_or_plan
    else:
        plan = make_plan(model, budget_or_plan, example_inputs, **plan_options)
    if hasattr(model, PLAN_ATTR):
        raise ValueError("the model is already converted by kwconvert; convert the original model")
    if calibration is not None and plan.method in methods.PER_LAYER_METHODS:
        raise ValueError(f"calibration fits KernelWarehouse cells below b = 1; a {plan.method} conversion "
                         "starts exactly as the original: drop it")
    with unpacked_attention(model, plan.unpacked_attention):  # the layers the plan names
        check_plan_fits(model, plan)
    check_memory(model, plan)
    if not inplace:
        model = copy.deepcopy(model)
    unpack_attention(model, plan.unpacked_attention)
    paths = _paths_by_module(model)
    if plan.method in methods.PER_LAYER_METHODS:
        scalings, parent_errors = _fit_parents(model, plan, init)
        layers = _convert_layers(model, plan, init, paths, scalings)
        plain = plan.plain if init == "none" else tuple(
            dataclasses.replace(static, fit_error=parent_errors.get(static.layer)) for static in plan.plain)
        setattr(model, PLAN_ATTR, dataclasses.replace(plan, layers=layers, plain=plain))
        return model
    grams = _calibration_grams(model, plan, calibration) if calibration is not None else {}
    fitted = []
    for warehouse_plan in plan.warehouses:
        originals = [model.get_submodule(layer.name) for layer in warehouse_plan.layers]
        # A layer converted in part (a fused qkv's value rows) is fitted on those rows only;
        # a weight-standardised one on the kernel it convolves with (kwconvert.compat).
        statics = [linear_rows(module, layer.rows) if layer.rows
                   else compat.plain_equivalent(module) if compat.extras_of(module) else module
                   for layer, module in zip(warehouse_plan.layers, originals)]
        warehouse = _new_warehouse(warehouse_plan, statics[0])
        kw_layers = [_kw_layer(layer, warehouse_plan, warehouse, static)
                     for layer, static in zip(warehouse_plan.layers, statics)]
        error, output_error = _initialise(warehouse_plan, warehouse, kw_layers, statics, init,
                                          [grams.get(layer.name) for layer in warehouse_plan.layers])
        for layer, original, kw_layer in zip(warehouse_plan.layers, originals, kw_layers):
            if layer.rows:
                replacement = PartlyDynamicLinear(original, kw_layer, layer.rows)
            elif compat.pads_dynamically(original):
                replacement = compat.SamePadded(kw_layer)
            else:
                replacement = kw_layer
            for path in paths[id(original)]:
                _set_submodule(model, path, replacement)
        fitted.append(dataclasses.replace(warehouse_plan, init_error=error, output_error=output_error))
    setattr(model, PLAN_ATTR, dataclasses.replace(plan, warehouses=tuple(fitted)))
    return model


def _fit_parents(model: nn.Module, plan: Plan, init: str) -> tuple[dict[str, tuple], dict[str, float | None]]:
    """KernelDNA's parents before their children are built: with ``fit_parent`` (plan
    option; absent in older plans, which kept parents exact) each parent's kernel is fitted
    with its children's scalings (:func:`fit_family`) and written into the parent layer.

    Returns the children's fitted scalings by name, and each parent's relative kernel error
    against its trained kernel: 0 when it stays exact, None where nothing is fitted
    (``init="random"`` or ``"none"``, the meta device).  Empty for ODConv (no parents).
    """
    families: dict[str, list[str]] = {}
    for layer in plan.layers:
        if layer.parent is not None:
            families.setdefault(layer.parent, []).append(layer.name)
    scalings, errors = {}, {}
    for parent_name, children in families.items():
        parent = model.get_submodule(parent_name)
        if init != "preserve" or parent.weight.is_meta:
            errors[parent_name] = None
        elif not plan.options.get("fit_parent", False):
            errors[parent_name] = 0.0
        else:
            trained = parent.weight.detach().clone()
            fit = fit_family(trained, [model.get_submodule(child).weight / FRESH_GATE for child in children])
            with torch.no_grad():
                parent.weight.copy_(fit.parent)
            scalings.update(zip(children, fit.scalings))
            errors[parent_name] = relative_error(parent.weight, trained)
    return scalings, errors


def _convert_layers(model: nn.Module, plan: Plan, init: str, paths: dict[int, list[str]],
                    scalings: dict[str, tuple]) -> tuple[DynamicLayerPlan, ...]:
    """Swap each layer of a per-layer plan for its dynamic layer; return the plan's layers
    with their fit errors (KernelDNA's children; ``init="none"`` keeps the plan's).

    ODConv: ``init="preserve"`` starts every layer as the convolution it replaces, at
    temperature 1 (its heads start at zero: no warm-up is needed); ``"random"`` is the
    authors' init, at their starting temperature (``odconv.temperature_at`` lowers it).
    KernelDNA: a child derives from its parent, which stays the model's own layer; its
    scalings are fitted here, or come from ``scalings`` when the parent was fitted with them.
    """
    fitted = []
    for layer in plan.layers:
        original = model.get_submodule(layer.name)
        if layer.parent is not None:
            replacement, error = KDNA_CLASS[layer.kind].from_conv(
                original, model.get_submodule(layer.parent), hidden=layer.hidden, name=layer.name, init=init,
                scalings=scalings.get(layer.name))
            fitted.append(layer if init == "none" else dataclasses.replace(layer, fit_error=error))
        else:
            replacement = OD_CLASS[layer.kind].from_conv(original, kernels=layer.kernels, hidden=layer.hidden,
                                                         name=layer.name, init=init)
            replacement.temperature = START_TEMPERATURE if init == "random" else 1.0
            fitted.append(layer)
        for path in paths[id(original)]:
            _set_submodule(model, path, replacement)
    return tuple(fitted)


def plan_of(model: nn.Module) -> Plan:
    """The Plan a converted model was built from (with init errors filled in)."""
    plan = getattr(model, PLAN_ATTR, None)
    if plan is None:
        raise ValueError("this model was not converted by kwconvert (it carries no plan)")
    return plan


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (Linux), or None where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_memory(model: nn.Module, plan: Plan) -> None:
    """Refuse a plan whose new warehouses and attention would not fit in memory.

    A large budget is legal (b = 4 is the paper's DY-Conv comparison; b = 1000 plans fine),
    but its warehouses are b times the model: better one clear message than the system
    killing the process half-way through the conversion.
    """
    available = available_memory()
    first = next(model.parameters(), None)
    if available is None or first is None or first.device.type != "cpu":
        return
    new_params = sum(w.params for w in plan.warehouses) + sum(layer.params for layer in plan.layers)
    needed = new_params * first.element_size()
    if needed > available:
        raise ValueError(f"the plan at b={plan.budget:g} needs {needed / 2**30:.1f} GiB for its warehouses and "
                         f"attention ({new_params:,} parameters), more than the {available / 2**30:.1f} GiB "
                         "of memory available: choose a smaller budget")


def check_plan_fits(model: nn.Module, plan: Plan) -> None:
    """Reject a plan that does not describe this model, with the first mismatch named.

    Plans are data a user may edit or load from disk.  Their own arithmetic (m, offsets,
    m_t, n against the cells) is :func:`kwconvert.plan.check_consistent`'s; what is left
    needs the model: every layer exists, is of the planned kind and has the planned
    kernel, and no layer is left out.
    """
    check_consistent(plan)
    _check_plan_covers(model, plan)
    for warehouse in plan.warehouses:
        for layer in warehouse.layers:
            where = f"plan warehouse {warehouse.name}, layer {layer.name}"
            _check_module_matches(_find(model, layer.name, where), layer, where)
    for layer in plan.layers:
        where = f"plan layer {layer.name}"
        _check_module_matches(_find(model, layer.name, where), layer, where)


def _check_plan_covers(model: nn.Module, plan: Plan) -> None:
    """Every conv / linear layer of the model is either converted or listed as plain.

    A layer the plan never mentions means the plan was made for another model (say
    resnet18's plan applied to resnet34, whose first layers have the same names).
    """
    covered = set(plan.converted_layers) | {static.layer for static in plan.plain}
    kinds = tuple(_STATIC_CLASS.values())
    for name, module in model.named_modules():
        if isinstance(module, kinds) and name not in covered:
            raise ValueError(f"the plan does not mention the model's layer {name}; "
                             f"it was made for another model (plan: {plan.model})")


def _find(model: nn.Module, name: str, where: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{where}: the model has no module of that name") from None


def _check_module_matches(module: nn.Module, layer: LayerPlan | DynamicLayerPlan, where: str) -> None:
    static_class = _STATIC_CLASS[layer.kind]  # a known kind: check_consistent
    if not isinstance(module, static_class):
        raise ValueError(f"{where}: planned as {layer.kind} but the model has {type(module).__name__}")
    shape = tuple(module.weight.shape)
    rows = getattr(layer, "rows", None)
    if rows is not None:
        start, stop = rows
        if layer.kind != "linear" or not 0 <= start < stop <= shape[0]:
            raise ValueError(f"{where}: rows {start}:{stop} do not lie in the {shape[0]} outputs of the "
                             f"model's {type(module).__name__}")
        shape = (stop - start, *shape[1:])
    if shape != tuple(layer.weight_shape):
        raise ValueError(f"{where}: planned kernel {'x'.join(map(str, layer.weight_shape))} "
                         f"but the model's is {'x'.join(map(str, shape))}")


def _paths_by_module(model: nn.Module) -> dict[int, list[str]]:
    """Every qualified name of every module: a module used at two places is swapped at both."""
    paths: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(name)
    return paths


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _new_warehouse(plan: WarehousePlan, first_static: nn.Module) -> Warehouse:
    weight = first_static.weight
    return Warehouse(plan.n, tuple(plan.cell), name=plan.name, device=weight.device, dtype=weight.dtype)


def _kw_layer(layer: LayerPlan, warehouse_plan: WarehousePlan, warehouse: Warehouse,
              static: nn.Module) -> nn.Module:
    return _KW_CLASS[layer.kind].from_module(
        static, warehouse=warehouse, offset=layer.offset, budget=warehouse_plan.budget,
        hidden=layer.hidden, attention_norm=warehouse_plan.attention_norm,
        basis_ratio=warehouse_plan.basis_ratio, name=layer.name)


def _initialise(plan: WarehousePlan, warehouse: Warehouse, kw_layers: list[nn.Module],
                statics: list[nn.Module], init: str,
                grams: list[torch.Tensor | None]) -> tuple[float | None, float | None]:
    """Fill the cells; return the relative reconstruction error of the kernels and, after a
    fit to calibration outputs (``grams`` of every layer given), that of the outputs."""
    with torch.no_grad():
        if init == "none":
            return plan.init_error, plan.output_error
        if init == "random":
            for layer in plan.layers:
                span = kw_cells.cells_handed_out(layer.cells, plan.budget)
                warehouse.reset_cells(layer.offset, layer.offset + span)
            return None, None
        if warehouse.cells.is_meta:  # shapes only: there are no kernel values to keep
            return None, None
        error, output_error = 0.0, None
        if plan.budget >= 1:
            for kw_layer, static in zip(kw_layers, statics):
                kw_layer.load_static_weight(static.weight)
        else:
            stacked = _stacked_blocks(kw_layers, statics, _fit_dtype(warehouse.cells.device))
            _fit_low_rank(warehouse, kw_layers, stacked)
            if grams and all(gram is not None for gram in grams):
                output_error = calibrate.fit_outputs(kw_layers, statics, grams, warehouse.cells)
            error = _kernel_error(warehouse, kw_layers, stacked)
        _hold_at_every_temperature(warehouse, kw_layers)
        return error, output_error


def _calibration_grams(model: nn.Module, plan: Plan, calibration) -> dict[str, torch.Tensor]:
    """Input Gram matrices of the layers of every warehouse below b = 1 whose layers all allow
    the fit to outputs (:func:`kwconvert.calibrate.supports`), from the original model."""
    layers = {}
    for warehouse in plan.warehouses:
        modules = {layer.name: model.get_submodule(layer.name) for layer in warehouse.layers}
        if warehouse.budget < 1 and all(map(calibrate.supports, modules.values())):
            layers.update(modules)
    return calibrate.input_grams(model, layers, calibration) if layers else {}


def _hold_at_every_temperature(warehouse: Warehouse, kw_layers: list[nn.Module]) -> None:
    """Keep the layers' kernels at every CAF temperature, not only at tau = 1.

    At tau = 1 CAF returns beta (Sec. 3.3), and the cells are cut (b >= 1) or fitted (b < 1)
    so that beta rebuilds the kernels.  Below 1 it mixes in the normalised logits, which a
    random attention makes arbitrary: the paper's schedule would walk a trained model away
    from what it learned.  Each attention therefore starts input-independent with logits
    that CAF maps to beta itself (``KWAttention.hold_beta``).  That needs every beta row's
    L1 norm within ``HOLDABLE_BETA_L1``; where a row exceeds it (one-to-one rows have norm
    1, fitted rows up to sqrt(n)), beta shrinks and the warehouse's cells grow by the same
    factor, which leaves every kernel ``beta @ cells`` as it was.
    """
    largest = max(float(layer.attention.beta[:, :-1].abs().sum(dim=-1).max()) for layer in kw_layers)
    if largest > HOLDABLE_BETA_L1:
        factor = HOLDABLE_BETA_L1 / largest
        warehouse.cells.div_(factor)
        for layer in kw_layers:
            layer.attention.set_beta(layer.attention.beta[:, :-1] * factor)
    for layer in kw_layers:
        layer.attention.hold_beta()


def _fit_low_rank(warehouse: Warehouse, kw_layers: list[nn.Module], stacked: torch.Tensor) -> None:
    """Best fit of all the warehouse's kernel blocks (``stacked``, :func:`_stacked_blocks`) by
    n cells (b < 1).

    The warehouse has fewer cells than the layers have blocks, so no one-to-one copy can
    hold them.  Stacking the blocks of every sharing layer as rows of X (m_t x cell size),
    the truncated SVD X ~ U_n S_n V_n^T is the least-squares optimum among all n-cell
    reconstructions (Eckart-Young): the cells become S_n V_n^T and each mixture's
    starting attention (beta, the tau = 1 point of the CAF, paper Sec. 3.3) becomes its
    row of U_n.
    """
    coefficients, cells, smallest = _truncated_svd(stacked, warehouse.n)
    rank = coefficients.shape[1]
    if rank < warehouse.n:  # cells no block needs: small random ones, free to learn later
        spare = torch.empty(warehouse.n - rank, stacked.shape[1], dtype=stacked.dtype, device=stacked.device)
        nn.init.normal_(spare, std=smallest / math.sqrt(stacked.shape[1]) if smallest > 0 else 0.01)
        cells = torch.cat([cells, spare])
        coefficients = torch.cat([coefficients, coefficients.new_zeros(coefficients.shape[0], warehouse.n - rank)], 1)
    warehouse.cells.copy_(cells.view_as(warehouse.cells).to(warehouse.cells))
    start = 0
    for kw_layer in kw_layers:
        kw_layer.attention.set_beta(coefficients[start:start + kw_layer.cells])
        start += kw_layer.cells


def _stacked_blocks(kw_layers: list[nn.Module], statics: list[nn.Module], dtype: torch.dtype) -> torch.Tensor:
    """Every layer's kernel cut into its blocks, stacked: ``(m_t, cell numel)``."""
    return torch.cat([kernel_to_blocks(kw_layer.tiling, static.weight.detach().to(dtype))
                      for static, kw_layer in zip(statics, kw_layers)], dim=0)


def _kernel_error(warehouse: Warehouse, kw_layers: list[nn.Module], stacked: torch.Tensor) -> float:
    """``|X - beta @ cells| / |X|`` over the stacked kernel blocks X: 0 where the copy is exact."""
    dtype = stacked.dtype
    rebuilt = torch.cat([layer.attention.beta[:, :-1].to(dtype) for layer in kw_layers]) \
        @ warehouse.cells.detach().to(dtype).reshape(warehouse.n, -1)
    norm = torch.linalg.norm(stacked)
    return float(torch.linalg.norm(stacked - rebuilt) / norm) if norm > 0 else 0.0


def _fit_dtype(device: torch.device) -> torch.dtype:
    """float64 for the least-squares fit, where the device has it (Apple's MPS has not)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``U_r``, ``S_r V_r^T`` and the smallest singular value of ``matrix`` (on its device).

    Through the eigenvectors of the smaller Gram matrix rather than LAPACK's SVD: the
    blocks matrix is wide (ResNet50's stage 3 at b = 1/2 is 552 x 16,384), where the SVD's
    bidiagonalisation takes seconds per warehouse and one matrix product a fraction of one.
    Squaring the condition number only blurs the directions past the n kept, whose
    projection is still a valid (and, for the kept ones, the optimal) reconstruction.
    """
    rows, columns = matrix.shape
    rank = min(rank, rows, columns)
    if rows <= columns:
        values, vectors = torch.linalg.eigh(matrix @ matrix.T)   # ascending
        left = vectors.flip(-1)[:, :rank]
        right_scaled = left.T @ matrix                          # S_r V_r^T
    else:
        values, vectors = torch.linalg.eigh(matrix.T @ matrix)
        right = vectors.flip(-1)[:, :rank]
        scaled_left = matrix @ right                            # U_r S_r
        singular = scaled_left.norm(dim=0)
        left = scaled_left / singular.clamp_min(torch.finfo(matrix.dtype).tiny)
        right_scaled = singular[:, None] * right.T
    smallest = float(values.clamp_min(0).min().sqrt()) if values.numel() else 0.0
    return left, right_scaled, smallest


def converted_layers(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """(name, layer) of every KernelWarehouse layer in the model."""
    kw_types = tuple(_KW_CLASS.values())
    return ((name, m) for name, m in model.named_modules() if isinstance(m, kw_types))
