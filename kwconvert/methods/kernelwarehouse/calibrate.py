"""Cells fitted to a trained model's outputs on data, for warehouses below b = 1.

Below b = 1 a warehouse holds fewer cells than its layers have kernel blocks, so the trained
kernels can only be approximated.  The truncated SVD of :mod:`.mapping` gives the best *kernels* in
least squares; what a trained model needs is the best *outputs*.  A kernel error along a
direction the layer's inputs never excite costs nothing, one along their main directions
costs much: for a layer with kernel W (rows per group, ``C_in/g * k`` columns) and the Gram
matrix G of the input patches it convolves, the output error of a kernel W' is
``tr((W' - W) G (W' - W)^T)`` exactly.  Given calibration inputs, :func:`fit_outputs`
minimises the sum of those errors, each relative to the layer's own output
``tr(W G W^T)``, over the cells and the mixtures' starting weights (beta, paper Sec. 3.3),
starting from the SVD fit, with L-BFGS (activation-aware low-rank compression, as ASVD and
SVD-LLM weight a factorisation by the inputs it sees).

On the Fashion-MNIST benchmark's residual net at b = 1/2 (README "Converting a trained
model") this takes the converted model from 82.8 % to 87.8 % right after conversion, against
88.3 % for the original.  Without calibration inputs the SVD fit is the conversion.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .layers import blocks_to_kernel

#: L-BFGS iterations per warehouse.  On the Fashion-MNIST net the output error falls 4-6x by
#: 50 (87.8 % right after conversion), a little more by 100 (87.7 %), less by 25 (87.5 %).
ITERATIONS = 50
#: Directions of a layer's input Gram matrix the fit weighs exactly (the largest); the others
#: count with their mean energy.  Keeps a 3x3 conv of 512 channels (D = 4,608) affordable:
#: the fit costs C_out x D x rank per evaluation instead of C_out x D^2.
GRAM_RANK = 256
#: Input patches unfolded at a time while the Gram matrices are gathered (elements).
PATCH_CHUNK = 1 << 24
#: Layer classes whose forward is torch's own, so their input patches are what they convolve.
SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


def supports(module: nn.Module) -> bool:
    """Whether the output error of ``module`` can be written from its input patches here:
    torch's Linear / Conv1d / Conv2d, or a subclass that keeps their forward."""
    return any(isinstance(module, base) and type(module).forward is base.forward for base in SUPPORTED)


def input_grams(model: nn.Module, layers: dict[str, nn.Module], calibration: Any) -> dict[str, torch.Tensor]:
    """Gram matrices ``(groups, D, D)`` (float64) of each layer's input patches over the
    calibration inputs, from forwards of ``model`` in eval mode without autograd (only of
    the layers the inputs reach).

    ``calibration`` is one batch (a tensor, or a tuple of the model's arguments) or an
    iterable of them, e.g. ``(images for images, _ in loader)``.
    """
    grams: dict[str, torch.Tensor] = {}

    def gather(name: str):
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            for patches in _patches(module, inputs[0].detach().float()):
                gram = (patches @ patches.transpose(1, 2)).double()  # float32 products, float64 sums
                grams[name] = grams[name] + gram if name in grams else gram
        return hook

    handles = [module.register_forward_hook(gather(name)) for name, module in layers.items()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            for batch in _batches(calibration):
                model(*batch) if isinstance(batch, tuple) else model(batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if layers and not grams:
        raise ValueError(f"the calibration inputs reach none of the {len(layers)} layers to fit: "
                         "pass inputs the model's forward takes")
    return grams  # a layer the inputs never reach has none: its warehouse keeps the kernel fit


def _batches(calibration: Any) -> Iterator[Any]:
    if isinstance(calibration, (torch.Tensor, tuple)):
        yield calibration
        return
    try:
        iterator = iter(calibration)
    except TypeError:
        raise TypeError(f"calibration must be a tensor of inputs, or an iterable of input batches, "
                        f"got {type(calibration).__name__}") from None
    empty = True
    for batch in iterator:
        empty = False
        if not isinstance(batch, (torch.Tensor, tuple)):
            raise TypeError(f"a calibration batch must be a tensor or a tuple of the model's arguments, got "
                            f"{type(batch).__name__} (a DataLoader's [inputs, labels]? pass "
                            "(inputs for inputs, _ in loader))")
        yield batch
    if empty:
        raise ValueError("the calibration inputs are empty")


def _patches(module: nn.Module, x: torch.Tensor) -> Iterator[torch.Tensor]:
    """The layer's input as ``(groups, D, positions)`` columns, a chunk of samples at a time:
    the vectors its kernel rows are multiplied with."""
    if isinstance(module, nn.Linear):
        rows = x.reshape(-1, x.shape[-1])
        step = max(PATCH_CHUNK // max(rows.shape[1], 1), 1)
        for start in range(0, rows.shape[0], step):
            yield rows[start:start + step].T.unsqueeze(0)
        return
    spatial = len(module.kernel_size)
    if x.dim() == spatial + 1:  # unbatched
        x = x.unsqueeze(0)
    if spatial == 1:  # Conv1d as a Conv2d of height 1: F.unfold takes 4-D inputs only
        x = x.unsqueeze(-2)
    kernel, stride, dilation = (_as_2d(getattr(module, name)) for name in ("kernel_size", "stride", "dilation"))
    pads = _pads(module)
    per_sample = x[:1].numel() * math.prod(kernel)
    step = max(PATCH_CHUNK // max(per_sample, 1), 1)
    for start in range(0, x.shape[0], step):
        chunk = x[start:start + step]
        if any(pads):
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            chunk = F.pad(chunk, pads, mode=mode)
        columns = F.unfold(chunk, kernel, dilation=dilation, stride=stride)  # (B, C_in * k, L)
        batch, depth, positions = columns.shape
        groups = module.groups
        yield columns.view(batch, groups, depth // groups, positions).permute(1, 2, 0, 3).reshape(
            groups, depth // groups, batch * positions)


def _as_2d(values: tuple[int, ...]) -> tuple[int, int]:
    return (1, values[0]) if len(values) == 1 else tuple(values)


def _pads(module: nn.Module) -> list[int]:
    """F.pad's amounts (last dimension first) for the padding the conv applies itself."""
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return [0, 0, 0, 0]
        totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]  # "same"
        sides = [(total // 2, total - total // 2) for total in totals]
    else:
        sides = [(p, p) for p in module.padding]
    if len(sides) == 1:
        sides = [(0, 0)] + sides
    return [amount for side in reversed(sides) for amount in side]


def _rows(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A kernel as ``(groups, C_out/g, C_in/g * k)``: each group's rows against its patches."""
    return weight.reshape(groups, weight.shape[0] // groups, -1)


def fit_outputs(kw_layers: list[nn.Module], statics: list[nn.Module], grams: list[torch.Tensor],
                cells: torch.Tensor, iterations: int = ITERATIONS) -> float:
    """Refine the warehouse's ``cells`` and each layer's beta in place so that the layers'
    outputs on the calibration inputs match the originals'; return the relative output error
    (root mean square over the layers of ``sqrt(tr(dW G dW^T) / tr(W G W^T))``).

    Starts from the current cells and beta (the SVD fit) and keeps them if L-BFGS does not
    improve on them.  Computes in float32 on the cells' device, each G through its largest
    ``GRAM_RANK`` directions (:class:`_OutputEnergy`).
    """
    dtype = torch.float32
    groups = [getattr(static, "groups", 1) for static in statics]
    targets = [_rows(static.weight.detach().to(dtype), g) for static, g in zip(statics, groups)]
    energies = [_OutputEnergy(gram.to(cells.device), dtype) for gram in grams]
    scales = [energy(target).clamp_min(torch.finfo(dtype).tiny) for energy, target in zip(energies, targets)]
    variables = [cells.detach().to(dtype).reshape(cells.shape[0], -1).clone().requires_grad_(True)]
    variables += [layer.attention.beta[:, :-1].detach().to(dtype).clone().requires_grad_(True) for layer in kw_layers]

    def error() -> torch.Tensor:
        flat_cells, betas = variables[0], variables[1:]
        total = 0.0
        for layer, beta, g, target, energy, scale in zip(kw_layers, betas, groups, targets, energies, scales):
            kernel = blocks_to_kernel(layer.tiling, beta @ flat_cells)
            total = total + energy(_rows(kernel, g) - target) / scale
        return total / len(kw_layers)

    optimizer = torch.optim.LBFGS(variables, max_iter=iterations, history_size=20, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-10, tolerance_change=1e-10)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = error()
        loss.backward()
        return loss

    with _autograd_on():
        with torch.no_grad():
            start = float(error())
        optimizer.step(closure)
        with torch.no_grad():
            end = float(error())
    with torch.no_grad():
        if not end < start:  # NaN or no better: keep the SVD fit
            return math.sqrt(max(start, 0.0))
        cells.copy_(variables[0].view_as(cells).to(cells))
        for layer, beta in zip(kw_layers, variables[1:]):
            layer.attention.set_beta(beta)
    return math.sqrt(max(end, 0.0))


class _OutputEnergy:
    """``sum over groups of tr(R G R^T)``, the squared output of kernel rows R ``(groups, o, D)``
    on the patches whose Gram matrix is G ``(groups, D, D)``.

    G is kept as its ``GRAM_RANK`` largest directions U with energies S, and the mean energy
    of the others, ``rest``: ``G ~ U S U^T + rest (I - U U^T)``, exact when D <= GRAM_RANK.
    """

    def __init__(self, gram: torch.Tensor, dtype: torch.dtype):
        depth = gram.shape[-1]
        if depth <= GRAM_RANK:
            energies, basis = torch.linalg.eigh(gram.double())
            rest = torch.zeros(gram.shape[0], dtype=energies.dtype, device=gram.device)
        else:  # randomised: LAPACK's full eigh of a 4,608 x 4,608 matrix takes seconds
            basis, energies, _ = torch.svd_lowrank(gram.to(dtype), q=GRAM_RANK, niter=2)
            trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1).to(dtype)
            rest = ((trace - energies.sum(-1)) / (depth - GRAM_RANK)).clamp_min(0)
        self.basis, self.rest = basis.to(dtype), rest.to(dtype)
        self.extra = (energies.clamp_min(0) - rest[:, None]).to(dtype)  # energy above the rest's

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        projected = rows @ self.basis                                   # (groups, o, rank)
        along = (projected.square() * self.extra[:, None, :]).sum()
        return along + (self.rest[:, None, None] * rows.square()).sum()


@contextlib.contextmanager
def _autograd_on() -> Iterator[None]:
    """The fit needs gradients even when convert() runs under no_grad or inference mode."""
    with torch.inference_mode(False), torch.enable_grad():
        yield
