"""Serving a converted model from float16 copies of its warehouses, with the error measured.

At batch 1-2 a KW model's inference is bound by its assembly (Sec. 3.2), and the assembly of
every layer reads its stage's whole warehouse: 1.18 GB per resnet50 forward in float32 (its
stage 3 warehouse, 36 MB, is streamed from memory by each of its 19 layers).  A float16 copy
halves those bytes and the compiled kernel converts it as it reads (``native.mixes_half``); the
sums stay float32 (resnet50 at batch 1: the assembly 60 -> 37 ms per forward on 2 cores).  The cost is float16's rounding of
the cells (about 2.4e-4 relative), so it is opt-in, and only after measuring what it does to
the model's outputs on the user's own inputs.
"""
from __future__ import annotations

import torch
from torch import nn

from . import native
from .layers import Warehouse
from .path_choice import forget_paths, output_tensors

#: How far the outputs may move, relative to their largest magnitude, by default.
HALF_TOLERANCE = 1e-3


def warehouses(model: nn.Module) -> dict[str, Warehouse]:
    """The model's warehouses by qualified name (``named_modules`` lists a warehouse once, under
    the first layer that holds it, however many share it)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, Warehouse)}


def output_error(reference, out) -> float:
    """The largest difference between two outputs, relative to the reference's largest magnitude."""
    error = 0.0
    for expected, got in zip(output_tensors(reference), output_tensors(out), strict=True):
        scale = expected.abs().max().item() or 1.0
        error = max(error, (got - expected).abs().max().item() / scale)
    return error


def half_warehouses(model: nn.Module, *example_inputs, tolerance: float = HALF_TOLERANCE) -> float:
    """Serve ``model``'s inference from float16 copies of its warehouses, if its outputs on
    ``example_inputs`` stay within ``tolerance`` of the float32 ones (relative to their
    largest magnitude); returns that error.

    Above the tolerance the warehouses stay float32 and ``ValueError`` says by how much it was
    missed; a model that is not float32 on the CPU (where the compiled kernel assembles) is
    refused the same way.  The measuring forward times the layers' paths again with the copies
    (as ``kwconvert.tune`` does), so the first request after this is not the slow one;
    ``kwconvert.save`` records the choice.
    Training and the ``"inline"`` path keep reading the float32 cells.
    """
    found = warehouses(model)
    if not found:
        raise ValueError("the model has no KernelWarehouse warehouses: convert it first (kwconvert.convert)")
    served = {(warehouse.cells.device.type, warehouse.cells.dtype) for warehouse in found.values()}
    if served != {("cpu", torch.float32)}:
        where = ", ".join(sorted(f"{dtype} on {device}" for device, dtype in served))
        raise ValueError(f"float16 warehouses serve float32 models on the CPU (the compiled kernel's assembly); "
                         f"this model's warehouses are {where}")
    if not native.mixes_half():
        raise RuntimeError(f"float16 warehouses need kwconvert's compiled AVX2 or AVX-512 kernel; this process runs "
                           f"{native.isa() or 'none'} (KWCONVERT_NATIVE / KWCONVERT_ISA, or reinstall with a C "
                           f"compiler): the warehouses stay float32")
    with torch.no_grad():
        reference = model(*example_inputs)
        set_half(model, True)  # drops the path choices: this forward times them again, as kwconvert.tune does
        error = output_error(reference, model(*example_inputs))
    if error > tolerance:
        set_half(model, False)
        raise ValueError(f"float16 warehouses move the outputs by {error:.2e} of their scale, more than the "
                         f"tolerance {tolerance:.0e}: the warehouses stay float32")
    return error


def set_half(model: nn.Module, enabled: bool) -> None:
    """Switch every warehouse of ``model`` to (or back from) float16 serving without measuring,
    and drop the layers' path choices (timed for the other storage)."""
    for warehouse in warehouses(model).values():
        warehouse.serves_half = enabled
    forget_paths(model)


def half_names(model: nn.Module) -> list[str]:
    """The warehouses served from float16, by name (what ``kwconvert.save`` records)."""
    return [name for name, warehouse in warehouses(model).items() if warehouse.serves_half]


def restore_half(model: nn.Module, names: list[str]) -> None:
    """Serve the named warehouses from float16 again (a loaded model, as it was saved); unknown names are skipped."""
    found = warehouses(model)
    for name in names:
        if name in found:
            found[name].serves_half = True
