"""Rewriter: model + Plan -> converted model, swapping layers in place.

Like PEFT's tuners, model-level code only finds the planned layers by qualified name and
swaps them (``get_submodule`` on the parent, then ``setattr``): the model keeps its own
class, forward, buffers and every other module.  The layers of a warehouse all register
the same ``Warehouse`` as a submodule (tied weights), so the cells move, train and save
with any part of the model that holds one of its layers; ``parameters()`` yields them once.

Three layers are not swapped one for one (the plan says which): a fused qkv whose value
rows alone are converted becomes a ``PartlyDynamicLinear``, the ``nn.MultiheadAttention``
modules the plan lists are first unpacked into four Linear layers (:mod:`kwconvert.multihead`),
and timm's 'SAME'-padded or weight-standardised convolutions are converted from the
kernel they convolve with, inside ``SamePadded`` when they pad (:mod:`kwconvert.compat`).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Iterable

import torch
from torch import nn

from . import compat, methods
from .methods.kernelwarehouse import calibrate, mapping
from .methods.kernelwarehouse.layers import KW_LAYER_TYPES, KWConv2d, PartlyDynamicLinear, linear_rows
from .methods.kerneldna import mapping as kerneldna_mapping
from .methods.kerneldna.layers import KDNA_CLASS
from .methods.odconv.layers import OD_CLASS, START_TEMPERATURE
from .plan import DynamicLayerPlan, LayerPlan, Plan, check_consistent, plan as make_plan
from .multihead import unpack_attention, unpacked_attention

#: Where the converted model keeps its plan.
PLAN_ATTR = "_kwconvert_plan"

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
        scalings, parent_errors = kerneldna_mapping.fit_parents(model, plan, init)
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
        warehouse = mapping.new_warehouse(warehouse_plan, statics[0])
        kw_layers = [mapping.kw_layer(layer, warehouse_plan, warehouse, static)
                     for layer, static in zip(warehouse_plan.layers, statics)]
        error, output_error = mapping.initialise(warehouse_plan, warehouse, kw_layers, statics, init,
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
    _plain_convolutions_channels_last(model)
    setattr(model, PLAN_ATTR, dataclasses.replace(plan, warehouses=tuple(fitted)))
    return model


def _plain_convolutions_channels_last(model: nn.Module) -> None:
    """Give the Conv2d layers left plain channels-last weights where the model has KW Conv2d
    layers, so that the whole network runs in one memory format.

    A KW Conv2d's fast paths read and write channels-last maps; a plain convolution with a
    channels-last weight does too (torch follows the weight's format).  Left NCHW, a plain stem
    hands NCHW maps to the layers after it: torch's NCHW ``max_pool2d`` after resnet18's stem took
    52 ms at batch 16 against 5 channels-last, and where NCHW and channels-last gradients met in
    backward each side was copied (resnet18 at batch 16: inference 1.29 -> 1.01 of the plain NCHW
    model, training step 1.67 -> 1.57, interleaved in one process).  Values are unchanged, only
    the weights' strides, and the state dict still holds contiguous tensors (``_contiguous_state``).
    """
    if not any(isinstance(module, KWConv2d) for module in model.modules()):
        return
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.to(memory_format=torch.channels_last)
            module.register_state_dict_post_hook(_contiguous_state)


def _contiguous_state(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """A channels-last weight enters the state dict contiguous, as the original's did: safetensors'
    ``save_file`` refuses other strides, and code that views a state dict's tensors expects them.
    Tensors asked for as variables (``keep_vars=True``) stay the parameters themselves."""
    for name, value in module.named_parameters(prefix=prefix.rstrip("."), recurse=False):
        held = state_dict.get(name)
        if held is not None and not isinstance(held, nn.Parameter) and not held.is_contiguous():
            state_dict[name] = held.contiguous()


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


def _calibration_grams(model: nn.Module, plan: Plan, calibration) -> dict[str, torch.Tensor]:
    """Input Gram matrices of the layers of every warehouse below b = 1 whose layers all allow
    the fit to outputs (:func:`kwconvert.methods.kernelwarehouse.calibrate.supports`), from the original model."""
    layers = {}
    for warehouse in plan.warehouses:
        modules = {layer.name: model.get_submodule(layer.name) for layer in warehouse.layers}
        if warehouse.budget < 1 and all(map(calibrate.supports, modules.values())):
            layers.update(modules)
    return calibrate.input_grams(model, layers, calibration) if layers else {}


def converted_layers(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """(name, layer) of every KernelWarehouse layer in the model."""
    return ((name, m) for name, m in model.named_modules() if isinstance(m, KW_LAYER_TYPES))
