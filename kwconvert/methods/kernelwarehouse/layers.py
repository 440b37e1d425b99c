"""KernelWarehouse layers: warehouses, the attention module with CAF, and KW Conv/Linear.

KernelWarehouse (Chao Li and Anbang Yao, "KernelWarehouse: Rethinking the Design of
Dynamic Convolution", ICML 2024, arXiv 2308.08361) cuts every static kernel W into m
cells of one shape (Sec. 3.2), lets the layers of a stage share a warehouse E of n cells,
and rebuilds each cell per input as a linear mixture ``w_i = sum_j alpha_ij e_j`` whose
attentions come from a small attention module with the contrasting-driven attention
function, CAF (Sec. 3.3).

This file holds the modules a converted model is made of:

* ``Warehouse``: the n learnable cells one stage shares;
* ``KWAttention``: pool -> fc1 -> norm -> ReLU -> fc2 (-> parameter saver) -> CAF;
* ``KWConv1d/2d/3d`` and ``KWLinear``: drop-in replacements for the torch layers that
  rebuild their kernel per sample from the warehouse;
* ``kernel_to_blocks`` / ``blocks_to_kernel``: the tiling between a kernel and its cells,
  which weight-preserving conversion uses in reverse;
* ``set_temperature`` / ``temperature_at``: the temperature schedule of Sec. 3.3;
* ``PartlyDynamicLinear``: a fused qkv projection whose value rows alone are a ``KWLinear``
  (:mod:`.projections` says which rows).

The forward below is the straightforward one (assemble per-sample kernels, convolve with
the batch folded into the groups); on CPU, Conv2d and Linear run it faster through
the paths of :mod:`.paths` (chosen by :mod:`.path_choice`) with the same results.
``kwconvert.reference_path()`` (a context manager) selects the straightforward path
everywhere, for comparison.

The arithmetic (cell counts, beta, saver sizes) lives in :mod:`.cells` so that the
planner's predictions and these modules cannot drift apart.
"""
from __future__ import annotations

import math
import operator
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ... import execution
from ...formatting import dims
from ...per_sample import (PADDING_MODES, PerSampleConv, Rank1, Rank2, Rank3, as_tuple, check_conv,
                           grad_in_input_format, layer_label, spatial_mean)
from . import assembly, path_choice, paths
from .cells import Tiling, cells_handed_out, cells_in, local_cells, one_to_one_cells, saver_basis

__all__ = [
    "CAF_EPS", "HELD_LOGIT_SCALE", "HOLDABLE_BETA_L1", "ATTENTION_NORMS", "PADDING_MODES", "Warehouse", "KWAttention", "KWConv1d",
    "KWConv2d", "KWConv3d", "KWLinear", "KW_LAYER_TYPES", "blocks_to_kernel",
    "contrasting_attention", "holding_logits", "is_kw_layer", "kernel_to_blocks", "one_to_one_beta",
    "PartlyDynamicLinear", "linear_rows", "set_temperature", "temperature_at",
]

#: The eps of CAF's normalisation, as in the reference implementation.
CAF_EPS = 1e-3
#: Norms the attention module accepts between fc1 and the ReLU.
ATTENTION_NORMS = ("batchnorm", "layernorm")


def _kaiming_fan_out(weight: Tensor) -> None:
    """Kaiming normal (fan_out, relu): the reference's init for cells and attention FCs."""
    if weight.numel():  # torch warns on empty tensors (a saver with no nonlocal cells)
        nn.init.kaiming_normal_(weight, mode="fan_out", nonlinearity="relu")


# --- warehouse ---------------------------------------------------------------------------


class Warehouse(nn.Module):
    """The n kernel cells ``e_1..e_n`` shared by the layers of one stage (Sec. 3.2).

    The cells are the only convolution weights a converted stage has: every layer of the
    stage rebuilds its kernel from them.  A cell is ``(f_e, c_e, 1, ...)`` in every
    published configuration, or a whole kernel for vanilla dynamic convolution (m = 1).
    Every layer of the stage registers the same Warehouse as its ``warehouse`` submodule,
    PyTorch's way of tying weights: ``parameters()`` of the model, of a block or of one
    layer yield the cells (once, however many layers share them), so optimisers, DDP and
    ``.to()`` reach them from anywhere; ``state_dict`` lists the one tensor under each
    layer's name, and ``kwconvert.save`` stores it once.
    """

    def __init__(self, n: int, cell: Sequence[int], name: str = "", device=None, dtype=None) -> None:
        super().__init__()
        label = f"warehouse {name}" if name else "warehouse"
        n = operator.index(n)
        cell = tuple(operator.index(size) for size in cell)
        if n < 1:
            raise ValueError(f"{label}: needs at least 1 cell, got n={n}")
        if len(cell) < 2 or any(size < 1 for size in cell):
            raise ValueError(f"{label}: cell {cell} needs at least 2 dimensions, all positive")
        self.name = name
        self.cells = nn.Parameter(torch.empty((n, *cell), device=device, dtype=dtype))
        self.reset_cells(0, n)
        self.register_load_state_dict_post_hook(assembly.cells_changed)  # no stale packed copy serves

    @property
    def n(self) -> int:
        return self.cells.shape[0]

    @property
    def cell(self) -> tuple[int, ...]:
        return tuple(self.cells.shape[1:])

    def reset_cells(self, start: int, end: int) -> None:
        """Re-initialise cells ``[start, end)`` as the reference does, one layer at a time.

        The reference draws each layer's range as one ``(-1, c_e, *k)`` tensor with kaiming
        normal (fan_out, relu), so the spread depends on how many cells a layer owns; doing
        the same keeps a from-scratch model statistically identical to the reference.
        """
        if not 0 <= start <= end <= self.n:
            raise ValueError(f"warehouse {self.name}: cell range [{start}, {end}) "
                             f"is not inside [0, {self.n})")
        with torch.no_grad():
            _kaiming_fan_out(self.cells[start:end].view(-1, *self.cell[1:]))

    @property
    def serves_half(self) -> bool:
        """Whether inference assembles kernels from a float16 copy of the cells (``kwconvert.half_warehouses``)."""
        return assembly.serves_half(self.cells)

    @serves_half.setter
    def serves_half(self, enabled: bool) -> None:
        assembly.serve_half(self.cells, bool(enabled))

    def extra_repr(self) -> str:
        return f"n={self.n}, cell={dims(self.cell)}" + (f", name={self.name!r}" if self.name else "") \
            + (", serves float16" if self.serves_half else "")


# --- tiling between a kernel and its cells ------------------------------------------------


def _grid(tiling: Tiling) -> tuple[tuple[int, ...], int, int]:
    """Blocks per spatial dim, output blocks and input blocks of a tiling (validating it)."""
    cells_in(tiling.weight_shape, tiling.cell)
    spatial = tuple(k // c for k, c in zip(tiling.weight_shape[2:], tiling.cell[2:]))
    return spatial, tiling.blocks_out, tiling.blocks_in


def blocks_to_kernel(tiling: Tiling, blocks: Tensor) -> Tensor:
    """Put m cell-shaped blocks ``(..., m, cell numel)`` back into kernels ``(..., C_out, C_in/g, *k)``.

    Mixture order is that of ``Tiling``: spatial block slowest (row-major over the spatial
    grid), then output block, then input block.  Spatial cells of any size that divides
    the kernel work, not just 1 x 1 and whole kernels.
    """
    spatial, blocks_out, blocks_in = _grid(tiling)
    lead = blocks.shape[:-2]
    if tuple(blocks.shape[-2:]) != (tiling.cells, math.prod(tiling.cell)):
        raise ValueError(f"blocks {dims(blocks.shape)} do not fit "
                         f"{tiling.cells} cells of {dims(tiling.cell)}")
    f_e, c_e, *cell_spatial = tiling.cell
    grid = blocks.reshape(*lead, *spatial, blocks_out, blocks_in, f_e, c_e, *cell_spatial)
    # grid axes after the lead: S_1..S_d, O, I, f_e, c_e, c_1..c_d
    first, d = len(lead), len(spatial)
    out_axes = (first + d, first + d + 2, first + d + 1, first + d + 3)
    spatial_axes = tuple(axis for j in range(d) for axis in (first + j, first + d + 4 + j))
    kernel = grid.permute(*range(first), *out_axes, *spatial_axes)
    return kernel.reshape(*lead, *tiling.weight_shape)


def kernel_to_blocks(tiling: Tiling, weight: Tensor) -> Tensor:
    """Cut kernels ``(..., C_out, C_in/g, *k)`` into their m blocks ``(..., m, cell numel)``.

    The inverse of ``blocks_to_kernel``; weight-preserving conversion writes these blocks
    into the cells the one-to-one beta assigns (Sec. 3.3).
    """
    spatial, blocks_out, blocks_in = _grid(tiling)
    d = len(spatial)
    lead = weight.shape[: weight.dim() - len(tiling.weight_shape)]
    if tuple(weight.shape[len(lead):]) != tiling.weight_shape:
        raise ValueError(f"kernel {dims(weight.shape)} is not {dims(tiling.weight_shape)}")
    f_e, c_e, *cell_spatial = tiling.cell
    per_dim = [size for pair in zip(spatial, cell_spatial) for size in pair]
    grid = weight.reshape(*lead, blocks_out, f_e, blocks_in, c_e, *per_dim)
    # grid axes after the lead: O, f_e, I, c_e, then (S_j, c_j) pairs
    first = len(lead)
    spatial_blocks = tuple(first + 4 + 2 * j for j in range(d))
    cell_axes = tuple(first + 5 + 2 * j for j in range(d))
    blocks = grid.permute(*range(first), *spatial_blocks, first, first + 2, first + 1, first + 3, *cell_axes)
    return blocks.reshape(*lead, tiling.cells, math.prod(tiling.cell))


# --- attention and CAF --------------------------------------------------------------------


def contrasting_attention(logits: Tensor, beta: Tensor, tau: float, eps: float = CAF_EPS) -> Tensor:
    """CAF (Sec. 3.3): ``alpha_ij = tau * beta_ij + (1 - tau) * z_ij / (sum_p |z_ip| + eps)``.

    The normalisation runs over the n + 1 logits of one mixture (e_z included) and keeps
    their signs: negative attentions let mixtures contrast cells, which is why CAF beats
    softmax and sigmoid.  At tau = 1 the result is exactly beta.
    """
    normalised = logits / logits.abs().sum(dim=-1, keepdim=True).add_(eps)
    if normalised.dtype != beta.dtype:  # autocast's bfloat16 logits: alpha in beta's float32, as the
        return tau * beta + (1.0 - tau) * normalised  # formula written out promotes it
    # in place on the temporaries: three fewer operators than the formula written out, the same
    # values (every layer runs CAF per forward; at batch 1 each operator is a few microseconds)
    return normalised.mul_(1.0 - tau).add_(beta, alpha=tau)


#: L1 norm of the held logits of a mixture (``holding_logits``).  A logit step moves a mixture's
#: weights by about step / scale, and SGD's steps shrink with the scale too, so the attention
#: learns about 1 / scale^2 as fast.  At 1, fine-tuning at the original model's learning rate
#: swung the kernels away from what was learned (Fashion-MNIST, KW 1x: 85.60 % -> 84.27 %);
#: at 10 it kept them (85.40 %), as an attention learning rate of 0.01x did at 1 (85.43 %).
#: The paper's random logits have L1 norms of about 6 at the start of training from scratch.
HELD_LOGIT_SCALE = 10.0
#: The largest L1 norm of a beta row that ``holding_logits`` can keep at every temperature.
HOLDABLE_BETA_L1 = 1.0 - CAF_EPS / HELD_LOGIT_SCALE


def holding_logits(beta: Tensor, scale: float = HELD_LOGIT_SCALE, eps: float = CAF_EPS) -> Tensor:
    """Logits ``(m, n + 1)`` that CAF turns into ``beta`` ``(m, n)`` at every temperature.

    CAF divides a mixture's n + 1 logits by their L1 norm plus eps (Sec. 3.3).  Logits equal
    to ``scale`` times beta on the n cells and ``scale * (1 - |beta_i|_1) - eps`` on e_z have
    an L1 norm of exactly ``scale - eps``, so the normalised logits are beta itself and
    ``alpha = tau * beta + (1 - tau) * beta = beta`` whatever tau is.  e_z is what makes this
    possible: its logit takes up the slack without entering any kernel.  Rows whose L1 norm
    exceeds ``1 - eps / scale`` (``HOLDABLE_BETA_L1``) cannot be held; the rewriter scales
    beta down and the cells up by the same factor first.
    """
    limit = 1.0 - eps / scale
    row_l1 = beta.abs().sum(dim=-1, keepdim=True)
    largest = float(row_l1.max()) if row_l1.numel() else 0.0
    if largest > limit + 1e-6:
        raise ValueError(f"a beta row of L1 norm {largest:.6g} cannot be held by CAF "
                         f"(at most {limit:g}): scale beta down and the cells up first")
    return scale * torch.cat([beta, (limit - row_l1).clamp_min(0.0)], dim=-1)


def one_to_one_beta(cells: int, n: int, offset: int, budget: float, *, device=None, dtype=None) -> Tensor:
    """Beta ``(m, n + 1)`` of the one-to-one initialisation (Sec. 3.3); column n is e_z."""
    beta = torch.zeros(cells, n + 1, device=device, dtype=dtype)
    for mixture, cell in enumerate(one_to_one_cells(cells, offset, budget)):
        if cell is not None and not 0 <= cell < n:
            raise ValueError(f"mixture {mixture} starts on cell {cell}, outside the warehouse of n={n}")
        beta[mixture, n if cell is None else cell] = 1
    return beta


class KWAttention(nn.Module):
    """Attention of one KW layer: alpha ``(B, m, n)`` from its input (Sec. 3.3).

    Global average pool -> fc1 (c_in -> hidden) -> norm -> ReLU -> fc2 (hidden ->
    m * (n + 1)) -> CAF per mixture.  The (n + 1)-th logit of each mixture belongs to e_z,
    the always-zero cell: it only takes part in the normalisation, so it is dropped from
    the returned alpha.  ``tau`` is the CAF temperature, 1.0 (= beta) on construction.

    With ``basis_ratio`` (the reference's ``nonlocal_basis_ratio``, used for b < 1) fc2
    only produces each mixture's logits for its ``local`` own cells, ``basis`` shared
    basis logits and e_z; a bias-free fc3 (shared by the layer's mixtures) maps the basis
    to the ``n - local`` nonlocal cells, and a bias of ``m * (n + 1)`` is added once the
    logits are back in cell order.
    """

    def __init__(self, in_channels: int, hidden: int, cells: int, n: int, *, offset: int = 0,
                 budget: float = 1.0, norm: str = "batchnorm", basis_ratio: float | None = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        if norm not in ATTENTION_NORMS:
            raise ValueError(f"attention norm must be one of {ATTENTION_NORMS}, got {norm!r}")
        if min(in_channels, hidden, cells, n) < 1:
            raise ValueError(f"attention needs positive sizes, got in_channels={in_channels}, "
                             f"hidden={hidden}, cells={cells}, n={n}")
        factory = {"device": device, "dtype": dtype}
        self.cells, self.n, self.offset, self.budget = cells, n, offset, budget
        self.basis_ratio = basis_ratio
        self.tau = 1.0
        self.fc1 = nn.Linear(in_channels, hidden, bias=norm != "batchnorm", **factory)
        norm_type = nn.BatchNorm1d if norm == "batchnorm" else nn.LayerNorm
        self.norm = norm_type(hidden, **factory)
        if basis_ratio is None:
            self.fc2 = nn.Linear(hidden, cells * (n + 1), **factory)
        else:
            self._build_saver(hidden, factory)
        # Persistent: a weight-preserving conversion at b < 1 replaces the one-to-one beta
        # by fitted coefficients, which a saved model must keep.
        self.register_buffer("beta", one_to_one_beta(cells, n, offset, budget, **factory))
        self.reset_parameters()

    def _build_saver(self, hidden: int, factory: dict) -> None:
        """The parameter saver's fc2 / fc3 / bias (reference impl. ``nonlocal_basis_ratio``)."""
        if not self.basis_ratio > 0:
            raise ValueError(f"basis_ratio must be positive, got {self.basis_ratio}")
        self.local = local_cells(self.cells, self.budget)
        self.basis = saver_basis(self.cells, self.n, self.budget, self.basis_ratio)
        nonlocal_cells = self.n - self.local
        if nonlocal_cells < 0:
            raise ValueError(f"parameter saver: {self.local} local cells exceed the warehouse of n={self.n}")
        self.fc2 = nn.Linear(hidden, (self.local + self.basis + 1) * self.cells, bias=False, **factory)
        with warnings.catch_warnings():  # a one-layer warehouse has no nonlocal cells: fc3 is empty
            warnings.filterwarnings("ignore", "Initializing zero-element tensors", UserWarning)
            self.fc3 = nn.Linear(self.basis, nonlocal_cells, bias=False, **factory)
        self.saver_bias = nn.Parameter(torch.zeros(self.cells * (self.n + 1), **factory))

    def set_beta(self, coefficients: Tensor) -> None:
        """Start each mixture on a given combination of cells ``(m, n)`` instead of one cell.

        Used by the weight-preserving fit for b < 1, where no one-to-one copy exists; e_z
        gets no weight.
        """
        if tuple(coefficients.shape) != (self.cells, self.n):
            raise ValueError(f"beta must be {self.cells}x{self.n}, got {dims(coefficients.shape)}")
        with torch.no_grad():
            self.beta.zero_()
            self.beta[:, :self.n] = coefficients.to(self.beta)

    def hold_beta(self) -> None:
        """Start the attention on beta at every temperature: the layer keeps its kernel.

        The last projection's weight becomes zero and its bias the logits that CAF maps to
        beta (``holding_logits``), so alpha is beta for every input and every tau, and a
        converted trained model computes what the original did until training moves it.
        Like LoRA's B starting at zero, the zero weight still gets gradients (the hidden
        features are not zero), and from the second step on so does everything before it.
        Cells the warehouse holds beyond beta's rows get alpha 0 and stay out of the kernel.
        """
        logits = holding_logits(self.beta[:, :-1]).reshape(-1)
        with torch.no_grad():
            self.fc2.weight.zero_()
            bias = self.saver_bias if self.basis_ratio is not None else self.fc2.bias
            bias.copy_(logits.to(bias))

    def reset_parameters(self) -> None:
        """Linear: kaiming normal (fan_out, relu) and zero bias; norm: weight 1, bias 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                _kaiming_fan_out(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.norm.reset_parameters()
        if self.basis_ratio is not None:
            nn.init.zeros_(self.saver_bias)

    def forward(self, x: Tensor) -> Tensor:
        """alpha ``(B, m, n)`` for features ``x`` of shape ``(B, C_in, *spatial)``."""
        alpha = contrasting_attention(self.logits(x), self.beta, self.tau)
        return alpha[..., :-1]

    def logits(self, x: Tensor) -> Tensor:
        """The logits z ``(B, m, n + 1)`` before CAF, in cell order with e_z last."""
        # the layer's convolution branch hands x's gradient back in x's format, the sum keeps it
        pooled = spatial_mean(x, gradient_in_format=False) if x.dim() > 2 else x
        hidden = F.relu(self._normalise(self.fc1(pooled)))
        if self.basis_ratio is None:
            return self.fc2(hidden).view(-1, self.cells, self.n + 1)
        return self._saver_logits(hidden)

    def _normalise(self, hidden: Tensor) -> Tensor:
        """The norm, with running statistics for a single sample in training mode.

        BatchNorm cannot estimate a variance from one sample (torch raises); a batch of one
        happens in detection heads, gradient accumulation and export traces, so it is
        normalised like in evaluation, and the running statistics are left untouched.
        """
        norm = self.norm
        if isinstance(norm, _BatchNorm) and norm.training and hidden.shape[0] == 1 \
                and norm.running_mean is not None:
            return F.batch_norm(hidden, norm.running_mean, norm.running_var, norm.weight, norm.bias,
                                training=False, eps=norm.eps)
        return norm(hidden)

    def _saver_logits(self, hidden: Tensor) -> Tensor:
        """Saver logits in cell order: [nonlocal before offset, local, nonlocal after, e_z]."""
        per_mixture = self.fc2(hidden).view(-1, self.local + self.basis + 1)
        local, basis, zero = per_mixture.split([self.local, self.basis, 1], dim=1)
        nonlocal_logits = self.fc3(basis)
        before, after = nonlocal_logits[:, :self.offset], nonlocal_logits[:, self.offset:]
        ordered = torch.cat([before, local, after, zero], dim=1)
        return ordered.view(-1, self.cells, self.n + 1) + self.saver_bias.view(self.cells, self.n + 1)

    def extra_repr(self) -> str:
        saver = f", basis_ratio={self.basis_ratio}" if self.basis_ratio is not None else ""
        return f"cells={self.cells}, n={self.n}, offset={self.offset}, tau={self.tau}{saver}"


# --- layers -------------------------------------------------------------------------------


def _place_layer(label: str, weight_shape: tuple[int, ...], warehouse: Warehouse, offset: int,
                 budget: float) -> int:
    """Check that a layer's kernel tiles into the warehouse's cells and fits in it; return m."""
    if not isinstance(warehouse, Warehouse):
        raise TypeError(f"{label}: warehouse must be a Warehouse, got {type(warehouse).__name__}")
    if not (budget > 0 and math.isfinite(budget)):
        raise ValueError(f"{label}: budget must be a positive finite number, got {budget}")
    n, cell = warehouse.n, warehouse.cell
    if n < 1:
        raise ValueError(f"{label}: warehouse {warehouse.name} has n={n} cells, needs at least 1")
    if len(cell) != len(weight_shape):
        raise ValueError(f"{label}: cell {dims(cell)} has rank {len(cell)}, "
                         f"kernel {dims(weight_shape)} has rank {len(weight_shape)}")
    try:
        cells = cells_in(weight_shape, cell)
    except ValueError as error:
        raise ValueError(f"{label}: {error}") from None
    handed_out = cells_handed_out(cells, budget)
    if offset < 0 or offset + handed_out > n:
        raise ValueError(f"{label}: offset {offset} + {handed_out} cells handed out ({cells} mixtures at "
                         f"b={budget}) = {offset + handed_out} does not fit warehouse {warehouse.name} "
                         f"of n={n} cells")
    return cells


class _KWLayer(nn.Module):
    """What KW Conv and Linear share: the shared warehouse, attention, assembly, bias."""

    _static_type: type[nn.Module]

    def __init__(self, weight_shape: tuple[int, ...], in_channels: int, out_channels: int, bias: bool, *,
                 warehouse: Warehouse, offset: int, budget: float, hidden: int, attention_norm: str,
                 basis_ratio: float | None, name: str, device, dtype) -> None:
        super().__init__()
        self.name = name
        self.weight_shape = tuple(weight_shape)
        self.cells = _place_layer(self._label, self.weight_shape, warehouse, offset, budget)
        self.offset, self.budget = offset, float(budget)
        self.tiling = Tiling(self.weight_shape, warehouse.cell)
        self.warehouse = warehouse  # a submodule shared with the stage's other layers (tied weights)
        self.attention = KWAttention(in_channels, hidden, self.cells, warehouse.n, offset=offset,
                                     budget=budget, norm=attention_norm, basis_ratio=basis_ratio,
                                     device=device, dtype=dtype)
        if bias:
            # Zero like the reference; from_module copies the static layer's bias over it.
            self.bias = nn.Parameter(torch.zeros(out_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    @property
    def _label(self) -> str:
        return layer_label(self.name, type(self))

    @property
    def tau(self) -> float:
        return self.attention.tau

    @tau.setter
    def tau(self, value: float) -> None:
        self.attention.tau = _checked_tau(value)

    @classmethod
    def from_module(cls, module: nn.Module, *, warehouse: Warehouse, offset: int, budget: float, hidden: int,
                    attention_norm: str = "batchnorm", basis_ratio: float | None = None, name: str = ""):
        """A KW layer with every hyper-parameter and the bias of ``module`` (not its weight).

        The weight is not copied here: for b >= 1 ``load_static_weight`` writes it into the
        warehouse, for b < 1 the rewriter fits the warehouse to all layers at once.
        """
        if not isinstance(module, cls._static_type):
            raise TypeError(f"{cls.__name__}.from_module needs a {cls._static_type.__name__}, "
                            f"got {type(module).__name__}")
        weight = module.weight
        layer = cls(*cls._static_arguments(module), warehouse=warehouse, offset=offset, budget=budget,
                    hidden=hidden, attention_norm=attention_norm, basis_ratio=basis_ratio, name=name,
                    device=weight.device, dtype=weight.dtype)
        if module.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(module.bias)
        return layer

    @staticmethod
    def _static_arguments(module: nn.Module) -> tuple:
        raise NotImplementedError

    def assemble_kernels(self, alpha: Tensor) -> Tensor:
        """Per-sample kernels ``(B, *weight_shape)`` from alpha ``(B, m, n)``.

        Each mixture is ``w_i = sum_j alpha_ij e_j`` (Sec. 3.2), and the m mixtures are put
        back in their places in the kernel.
        """
        cells = self.warehouse.cells
        if execution.is_reference():
            blocks = torch.matmul(alpha, cells.reshape(cells.shape[0], -1))
        else:
            batch, mixtures, n = alpha.shape
            blocks = assembly.mix(alpha.reshape(batch * mixtures, n), cells).view(batch, mixtures, -1)
        return blocks_to_kernel(self.tiling, blocks)

    def kernel_at_beta(self) -> Tensor:
        """The kernel the layer starts from: its cells mixed by beta (the tau = 1 point)."""
        beta = self.attention.beta[:, :-1].unsqueeze(0)
        return self.assemble_kernels(beta.to(self.warehouse.cells))[0]

    def load_static_weight(self, weight: Tensor) -> None:
        """Write a static kernel into the cells that beta assigns to this layer (b >= 1).

        With tau = 1 the layer then computes exactly the static layer (Sec. 3.3: each
        mixture starts on one cell).  For b < 1 several mixtures share cells or start on
        e_z, so the kernel cannot be stored cell by cell; the rewriter fits it instead.
        """
        if self.budget < 1:
            raise ValueError(f"{self._label}: b={self.budget} < 1 shares cells between mixtures; "
                             "its warehouse needs a least-squares fit, not a copy")
        if tuple(weight.shape) != self.weight_shape:
            raise ValueError(f"{self._label}: weight {dims(weight.shape)} is not {dims(self.weight_shape)}")
        cells = self.warehouse.cells
        blocks = kernel_to_blocks(self.tiling, weight.detach()).reshape(self.cells, *self.warehouse.cell)
        assigned = torch.tensor(one_to_one_cells(self.cells, self.offset, self.budget), device=cells.device)
        with torch.no_grad():
            cells.index_copy_(0, assigned, blocks.to(cells))

    def _add_bias(self, out: Tensor, channel_dim: int) -> Tensor:
        if self.bias is None:
            return out
        shape = [1] * out.dim()
        shape[channel_dim] = -1
        return out + self.bias.view(shape)

    def _kw_repr(self) -> str:
        # The warehouse prints as a child of one line, with its name and size.
        return f"cells={self.cells}, offset={self.offset}, budget={self.budget}"


class _KWConvNd(PerSampleConv, _KWLayer):
    """KW convolution (any rank): kernel rebuilt per sample, then a per-sample convolution."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *, warehouse: Warehouse,
                 offset: int, budget: float, hidden: int, attention_norm: str = "batchnorm",
                 basis_ratio: float | None = None, name: str = "", device=None, dtype=None) -> None:
        label = layer_label(name, type(self))  # checked before the warehouse hands out cells
        kernel_size = as_tuple(kernel_size, self._spatial_dims, "kernel_size", label)
        check_conv(label, in_channels, out_channels, groups, "valid", (1,), padding_mode)
        super().__init__((out_channels, in_channels // groups, *kernel_size), in_channels, out_channels, bias,
                         warehouse=warehouse, offset=offset, budget=budget, hidden=hidden,
                         attention_norm=attention_norm, basis_ratio=basis_ratio, name=name,
                         device=device, dtype=dtype)
        self._set_geometry(label, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                           padding_mode)
        #: The fast path this layer takes per input (path_choice.py: timed once, kept with a save)
        self.path_choices: dict[tuple, str] = {}

    @staticmethod
    def _static_arguments(module: nn.Module) -> tuple:
        return (module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                module.dilation, module.groups, module.bias is not None, module.padding_mode)

    def forward(self, x: Tensor) -> Tensor:
        x, unbatched = self._check_input(x)
        if x.shape[0] == 0:
            return self._empty_batch(x)
        alpha = self.attention(x)                  # (B, m, n), Sec. 3.3
        if self._spatial_dims == 2 and not execution.is_reference():
            out = path_choice.conv2d(self, grad_in_input_format(x), alpha)  # the same as below, faster on CPU
        else:
            weight = self.assemble_kernels(alpha)  # (B, C_out, C_in/g, *k), Sec. 3.2
            out = self._add_bias(self._per_sample_conv(x, weight), channel_dim=1)
        return out.squeeze(0) if unbatched else out

    def extra_repr(self) -> str:
        return f"{self._geometry_repr()}, {self._kw_repr()}"


class KWConv1d(Rank1, _KWConvNd):
    """KernelWarehouse drop-in for ``nn.Conv1d``."""


class KWConv2d(Rank2, _KWConvNd):
    """KernelWarehouse drop-in for ``nn.Conv2d``."""


class KWConv3d(Rank3, _KWConvNd):
    """KernelWarehouse drop-in for ``nn.Conv3d``."""


class KWLinear(_KWLayer):
    """KernelWarehouse drop-in for ``nn.Linear`` (the paper applies KW to ViT projections).

    Input ``(B, ..., in_features)``: dim 0 is the sample, every dim between it and the
    last is pooled by the attention (tokens of a ViT), and each sample's rows are
    multiplied by that sample's weight.  A 1-D input is a single sample.
    """
    _static_type = nn.Linear

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, warehouse: Warehouse,
                 offset: int, budget: float, hidden: int, attention_norm: str = "batchnorm",
                 basis_ratio: float | None = None, name: str = "", device=None, dtype=None) -> None:
        super().__init__((out_features, in_features), in_features, out_features, bias, warehouse=warehouse,
                         offset=offset, budget=budget, hidden=hidden, attention_norm=attention_norm,
                         basis_ratio=basis_ratio, name=name, device=device, dtype=dtype)
        self.in_features, self.out_features = in_features, out_features

    @staticmethod
    def _static_arguments(module: nn.Module) -> tuple:
        return module.in_features, module.out_features, module.bias is not None

    def forward(self, x: Tensor) -> Tensor:
        single = x.dim() == 1
        batch = x.unsqueeze(0) if single else x
        if batch.shape[-1] != self.in_features:
            raise ValueError(f"{self._label}: expected input (..., {self.in_features}), got {tuple(x.shape)}")
        if batch.numel() == 0:  # no sample or no row: empty, as nn.Linear's output
            return F.linear(x, x.new_zeros(self.out_features, self.in_features))
        rows = batch.reshape(batch.shape[0], -1, self.in_features)    # (B, L, in)
        alpha = self.attention(rows.transpose(1, 2))                   # (B, m, n), pooled over L
        if rows.device.type == "cpu" and not execution.is_reference():
            out = paths.linear_layer(self, rows, alpha)                 # the same as below, faster
        else:
            weight = self.assemble_kernels(alpha)                      # (B, out, in)
            out = self._add_bias(torch.bmm(rows, weight.transpose(1, 2)), channel_dim=2)
        out = out.reshape(*batch.shape[:-1], self.out_features)
        return out.squeeze(0) if single else out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self._kw_repr()}")


#: Every KernelWarehouse layer type.
KW_LAYER_TYPES = (KWConv1d, KWConv2d, KWConv3d, KWLinear)


def is_kw_layer(module: nn.Module) -> bool:
    """True for the KernelWarehouse layers (the modules ``set_temperature`` reaches)."""
    return isinstance(module, KW_LAYER_TYPES)


# --- temperature --------------------------------------------------------------------------


def _checked_tau(tau: float) -> float:
    tau = float(tau)
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"temperature must lie in [0, 1], got {tau}")
    return tau


def set_temperature(model: nn.Module, tau: float) -> int:
    """Set the CAF temperature of every KW layer of ``model``; return how many there are."""
    tau = _checked_tau(tau)
    layers = [module for module in model.modules() if is_kw_layer(module)]
    for layer in layers:
        layer.tau = tau
    return len(layers)


def temperature_at(epoch: float, warmup_epochs: float) -> float:
    """The paper's schedule (Sec. 3.3): tau falls linearly from 1 to 0 over the warm-up.

    ``epoch`` may be fractional (per-iteration updates).  With no warm-up
    (``warmup_epochs <= 0``) the attention is fully learned from the start: 0.0.
    """
    if not epoch >= 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if warmup_epochs <= 0:
        return 0.0
    return max(0.0, 1.0 - epoch / warmup_epochs)


def linear_rows(linear: nn.Linear, rows: tuple[int, int]) -> nn.Linear:
    """A new Linear computing output rows ``[start, stop)`` of ``linear`` (weights copied)."""
    start, stop = rows
    weight = linear.weight
    part = nn.Linear(linear.in_features, stop - start, bias=linear.bias is not None,
                     device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        part.weight.copy_(weight[start:stop])
        if linear.bias is not None:
            part.bias.copy_(linear.bias[start:stop])
    return part


class PartlyDynamicLinear(nn.Module):
    """A Linear whose output rows ``[start, stop)`` come from a KernelWarehouse layer.

    The other rows (a fused qkv's query and key) stay a static Linear; the outputs are
    concatenated back in the original row order, so the module is a drop-in for the
    Linear it replaces.
    """

    def __init__(self, linear: nn.Linear, dynamic: nn.Module, rows: tuple[int, int]) -> None:
        super().__init__()
        start, stop = rows
        if not 0 <= start < stop <= linear.out_features:
            raise ValueError(f"rows {start}:{stop} are not inside the {linear.out_features} outputs")
        if getattr(dynamic, "out_features", stop - start) != stop - start:
            raise ValueError(f"the dynamic part has {dynamic.out_features} outputs, rows {start}:{stop} need "
                             f"{stop - start}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.rows = (start, stop)
        weight = linear.weight
        self.static = nn.Linear(linear.in_features, linear.out_features - (stop - start),
                                bias=linear.bias is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.static.weight.copy_(torch.cat([weight[:start], weight[stop:]]))
            if linear.bias is not None:
                self.static.bias.copy_(torch.cat([linear.bias[:start], linear.bias[stop:]]))
        self.dynamic = dynamic

    def forward(self, x: Tensor) -> Tensor:
        start, _ = self.rows
        static = self.static(x)
        return torch.cat([static[..., :start], self.dynamic(x), static[..., start:]], dim=-1)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"dynamic rows {self.rows[0]}:{self.rows[1]}")
