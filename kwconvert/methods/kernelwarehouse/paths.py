"""The ways a KernelWarehouse Conv2d (and KWLinear) runs on CPU: same arithmetic, other execution.

A KW layer assembles every sample's kernel (:mod:`.assembly`) and then convolves each
sample with its own kernel.  The straightforward way, which the authors use and
``reference_path()`` keeps, is one matrix product for the assembly and one convolution with
the batch folded into the groups.  On CPU both are slow: the assembly shapes (few rows, an
inner size of n = 27-138 cells, outputs of many megabytes) run far below peak in MKL, and a
batch-folded grouped convolution is a poor fit for oneDNN once maps are small and channels
many.  The paths here (:mod:`.path_choice` times them and keeps the fastest per layer and
input):

* each sample's kernel is read in OHWI order ``(C_out, kh, kw, C_in)``, what both consumers
  want (oneDNN's channels-last convolution and the NHWC im2col product); it is re-ordered
  from the assembly's output one sample at a time, into a buffer that stays in cache, and
  for a 1x1 convolution whose cells span the input channels (and for Linear) it needs no
  copy at all;
* ``"matmul"`` (NHWC im2col and one matrix product per sample, best for small maps and
  batch 1), ``"conv"`` (one oneDNN convolution per sample, best for large maps),
  ``"grouped"`` (the batch folded into the groups, the reference's convolution) and
  ``"folded"`` (the same, with the batch folded into the channels of a channels-last image:
  2-6x faster for depthwise layers on small maps), ``"bmm"`` (batched products, one per
  output block, the kernels assembled from transposed cells straight in the order they
  read; in training the batch goes through in slices of ``BATCHED_SLICE_BYTES`` of kernels)
  and ``"premix"`` (no kernel at all: the inputs mixed per cell by the attentions, then one
  product with the stacked warehouse; for maps of a few pixels, where assembling costs more
  than convolving);
* for ``"matmul"`` and ``"conv"`` one autograd node covers assembly and convolution: it
  keeps only the attention, the warehouse and the input, and assembles the kernels again
  in backward instead of holding a batch of kernels per layer until then (the assembly and
  its gradients in the compiled kernel where it is built: ``assembly.mix_grads``);
* ``"native"`` (inference) runs each sample's product in a compiled kernel (:mod:`.native`)
  that reads the kernels straight from the assembly's output: no per-sample weight reorder
  inside a library GEMM, no copy into OHWI order; ``"inline"`` runs the assembly inside that
  kernel too, a chunk of a few samples' kernels at a time in a buffer that stays in cache: no
  batch of kernels is ever written out (the late stages, where kernels are big); it also trains
  (``_KWConv2dInline``: the backward in the compiled kernel as well).

The other paths' convolutions are PyTorch's; without the extension every path but ``"native"``
and ``"inline"`` runs on PyTorch alone.  Results equal the straightforward path to float
rounding (tests/test_fast.py, tests/test_native.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ... import execution
from . import native
from .assembly import (RowsGradient, _assembled, _keeps_autocast, _Kernels, _needs_grad, _ohwi_grid, cached_inline,
                       inline_product, mix_grads, panel_ordered, training_rows)
from .cells import Tiling


#: A batch of kernels up to this size may be kept from forward to backward in training
#: (``"grouped"``; ``"bmm"`` then does not assemble them again in backward), and the layer's
#: path is timed forward and backward; on maps of at most ``SMALL_MAP`` pixels (the late
#: stages of 28 x 28 / 32 x 32 images), where assembling costs more than convolving, up to
#: eight times as much.  Bigger batches of kernels are assembled again in backward: kept,
#: they would add to a training step's peak memory (resnet50 at batch 8: 75 MB per layer4 conv).
KEEP_KERNELS_BYTES = 4 << 20
SMALL_MAP = 64


def _keep_limit(x: Tensor) -> int:
    """Bytes of kernels that may be kept for backward for this (B, C, H, W) input."""
    return KEEP_KERNELS_BYTES * (8 if x.shape[2] * x.shape[3] <= SMALL_MAP else 1)


@dataclass(frozen=True)
class ConvSpec:
    """What a fused KW Conv2d node needs besides tensors (frozen: torch.compile takes it as a constant)."""
    tiling: Tiling
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    padding: tuple[int, int, int, int]  # zeros: top, bottom, left, right
    groups: int
    path: str

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return native.output_size((height, width), self.kernel, self.stride, self.dilation, self.padding)

    @property
    def symmetric(self) -> bool:
        top, bottom, left, right = self.padding
        return top == bottom and left == right


def _per_sample(product: Callable[[int], Tensor], batch: int, channels_last: bool = False) -> Tensor:
    """``stack([product(i) for i in range(batch)])``, holding one sample's result at a time
    (``channels_last``: products are ``(C, H, W)`` images, stacked channels-last).

    One sample after another: handing samples to single-threaded worker threads measured
    slower at the model level (resnet18 batch 16 on 2 threads: 1.66 against 1.54 times the
    plain model)."""
    first = product(0)
    if batch == 1:
        return first.unsqueeze(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty((batch, *first.shape), dtype=first.dtype, device=first.device, memory_format=layout)
    out[0] = first
    first = None  # noqa: F841 (release it)
    for i in range(1, batch):
        out[i] = product(i)
    return out


def _im2col(spec: ConvSpec, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """NHWC im2col ``(B, OH * OW, kh * kw * C)`` of a channels-last input, in OHWI's K order.

    A 1x1 stride-1 unpadded convolution needs no copy: the input is the matrix.
    """
    out_h, out_w = spec.output_size(*x.shape[2:])
    if _is_pointwise(spec):
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], out_h * out_w, x.shape[1]), (out_h, out_w)
    return native.im2col(x, spec.kernel, spec.stride, spec.dilation, spec.padding), (out_h, out_w)


def _im2col_t(spec: ConvSpec, x: Tensor) -> Tensor:
    """``_im2col`` transposed, ``(B, kh * kw * C, OH * OW)``, gathered from the input in one copy."""
    return native.im2col(x, spec.kernel, spec.stride, spec.dilation, spec.padding, transposed=True)


def _is_pointwise(spec: ConvSpec) -> bool:
    """A 1x1 stride-1 unpadded convolution: its im2col is the channels-last input itself."""
    return spec.kernel == (1, 1) and spec.stride == (1, 1) and not any(spec.padding)


def _col2im(spec: ConvSpec, grad_cols: Tensor, shape: torch.Size) -> Tensor:
    """The gradient of ``_im2col``: the pixels' sums of the rows that read them."""
    if _is_pointwise(spec):
        batch, channels, height, width = shape
        return grad_cols.view(batch, height, width, channels).permute(0, 3, 1, 2)
    return native.col2im(grad_cols, shape, spec.kernel, spec.stride, spec.dilation, spec.padding)


def _matmul_forward(spec: ConvSpec, x: Tensor, kernels: _Kernels, bias: Tensor | None) -> Tensor:
    cols, (out_h, out_w) = _im2col(spec, x)
    out_channels = spec.tiling.weight_shape[0]
    out = _per_sample(lambda i: F.linear(cols[i], kernels[i].view(out_channels, -1), bias), x.shape[0])
    return out.view(x.shape[0], out_h, out_w, out_channels).permute(0, 3, 1, 2)


def _matmul_backward(spec: ConvSpec, x: Tensor, kernels: _Kernels, grad: Tensor, grad_grid: Tensor | None,
                     need_x: bool) -> Tensor | None:
    """The input's gradient; the kernels' gradients go into ``grad_grid`` (an OHWI view)."""
    batch, out_channels = grad.shape[:2]
    grad_rows = grad.permute(0, 2, 3, 1).reshape(batch, -1, out_channels)
    cols = _im2col(spec, x)[0] if grad_grid is not None else None

    def kernel_grad(i: int) -> None:
        grad_kernel = F.linear(grad_rows[i].t().contiguous(), cols[i].t())
        grad_grid[i].copy_(grad_kernel.view(grad_grid.shape[1:]))

    def input_grad(i: int) -> Tensor:
        if grad_grid is not None:
            kernel_grad(i)
        return F.linear(grad_rows[i], kernels[i].view(out_channels, -1).t())

    if not need_x:
        for i in range(batch):
            kernel_grad(i)
        return None
    return _col2im(spec, _per_sample(input_grad, batch), x.shape)


def _conv_input(spec: ConvSpec, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
    top, bottom, left, right = spec.padding
    if spec.symmetric:
        return x, (top, left)
    return F.pad(x, (left, right, top, bottom)), (0, 0)


def _conv_forward(spec: ConvSpec, x: Tensor, kernels: _Kernels, bias: Tensor | None) -> Tensor:
    inputs, padding = _conv_input(spec, x)
    return _per_sample(lambda i: F.conv2d(inputs[i:i + 1], kernels[i].permute(0, 3, 1, 2),  # OIHW, NHWC strides
                                          bias, spec.stride, padding, spec.dilation, spec.groups)[0],
                       x.shape[0], channels_last=True)


def _conv_backward(spec: ConvSpec, x: Tensor, kernels: _Kernels, grad: Tensor, grad_grid: Tensor | None,
                   need_x: bool) -> Tensor | None:
    inputs, padding = _conv_input(spec, x)
    grad = grad.contiguous(memory_format=torch.channels_last)

    def sample_grads(i: int) -> Tensor | None:
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad[i:i + 1], inputs[i:i + 1], kernels[i].permute(0, 3, 1, 2), None, spec.stride, padding,
            spec.dilation, False, (0, 0), spec.groups, (need_x, grad_grid is not None, False))
        if grad_grid is not None:  # (C_out, C_in/g, kh, kw) -> (O, f_e, kh, kw, I, c_e)
            grad_w = grad_w.permute(0, 2, 3, 1).unflatten(-1, grad_grid.shape[-2:])
            grad_grid[i].copy_(grad_w.unflatten(0, grad_grid.shape[1:3]))
        return grad_x[0] if need_x else None

    if not need_x:
        for i in range(x.shape[0]):
            sample_grads(i)
        return None
    grad_x = _per_sample(sample_grads, x.shape[0], channels_last=True)
    if not spec.symmetric:
        top, _, left, _ = spec.padding
        grad_x = grad_x[:, :, top:top + x.shape[2], left:left + x.shape[3]]
    return grad_x


_FORWARD = {"matmul": _matmul_forward, "conv": _conv_forward}
_BACKWARD = {"matmul": _matmul_backward, "conv": _conv_backward}


@_keeps_autocast
class _KWConv2d(torch.autograd.Function):
    """Assembly and per-sample convolution as one autograd node.

    Saves alpha, the warehouse and the input only; backward assembles the kernels again
    (one product of alpha and the warehouse) rather than keeping a batch of kernels alive
    from forward to backward.
    """

    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor, cells: Tensor, bias: Tensor | None, spec: ConvSpec) -> Tensor:
        ctx.spec = spec
        ctx.save_for_backward(x, alpha, cells)
        kernels = _Kernels(spec.tiling, _assembled(spec.tiling, alpha, cells))
        return _FORWARD[spec.path](spec, x, kernels, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, alpha, cells = ctx.saved_tensors
        spec = ctx.spec
        need_x, need_alpha, need_cells, need_bias = ctx.needs_input_grad[:4]
        blocks = _assembled(spec.tiling, alpha, cells)
        grad_blocks = torch.empty_like(blocks) if need_alpha or need_cells else None
        grad_grid = None if grad_blocks is None else _ohwi_grid(spec.tiling, grad_blocks)
        grad_x = _BACKWARD[spec.path](spec, x, _Kernels(spec.tiling, blocks), grad, grad_grid, need_x)
        blocks = None  # a batch of kernels: release before the next products  # noqa: F841
        grad_alpha = grad_cells = grad_bias = None
        if grad_blocks is not None:
            batch, mixtures, n = alpha.shape
            grad_alpha, grad_cells = mix_grads(alpha.reshape(batch * mixtures, n), cells,
                                               grad_blocks.view(batch * mixtures, -1), (need_alpha, need_cells))
            grad_alpha = None if grad_alpha is None else grad_alpha.view_as(alpha)
        if need_bias:
            grad_bias = grad.sum(dim=(0, 2, 3))
        return grad_x, grad_alpha, grad_cells, grad_bias, None


# --- the batched product (small maps) -------------------------------------------------------


def _block_major(tiling: Tiling, alpha: Tensor, inverse: bool = False) -> Tensor:
    """alpha ``(B, m, n)`` with its mixtures re-ordered output block first: (output block,
    kernel position, input block) instead of the tiling's (kernel position, output block,
    input block); ``inverse``: back (for alpha's gradient).  A copy of alpha only (small),
    where the kernels' permutation would copy a whole batch of kernels (``_block_kernels``)."""
    if tiling.blocks_out == 1:
        return alpha
    outer = (tiling.blocks_out, tiling.spatial) if inverse else (tiling.spatial, tiling.blocks_out)
    grid = alpha.view(alpha.shape[0], *outer, tiling.blocks_in, alpha.shape[2])
    return grid.transpose(1, 2).reshape(alpha.shape)


def _block_kernels(tiling: Tiling, blocks: Tensor) -> Tensor:
    """Blocks assembled from ``_block_major`` alpha and transposed cells
    (``native.panel_order`` of width f_e: each cell ``(c_e, f_e)`` row-major) as every
    sample's kernel ``(B, OB, K, f_e)``, no copy: output block o's ``(K, f_e)`` matrix has
    its rows in the NHWC im2col's K order (kernel position, input block, channel)."""
    f_e = tiling.cell[0]
    return blocks.view(blocks.shape[0], tiling.blocks_out, -1, f_e)


def _bmm_product(cols: Tensor, kernels: Tensor, bias: Tensor | None) -> Tensor:
    """``(B, L, C_out)``: the im2col rows times each output block's kernels, one batched
    product per output block (strided views of the kernels: no copy of them)."""
    f_e = kernels.shape[3]
    parts = []
    for block in range(kernels.shape[1]):
        if bias is None:
            parts.append(torch.bmm(cols, kernels[:, block]))
        else:
            parts.append(torch.baddbmm(bias[block * f_e:(block + 1) * f_e].view(1, 1, -1), cols, kernels[:, block]))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _bmm_forward(spec: ConvSpec, x: Tensor, kernels_of: Callable[[slice], Tensor], bias: Tensor | None,
                 slices: list[slice]) -> Tensor:
    """NHWC im2col and a batched product with the ``_block_kernels`` of each slice of the
    batch (``kernels_of(part)``), into one ``(B, C_out, OH, OW)`` channels-last output."""
    out_h, out_w = spec.output_size(*x.shape[2:])
    if len(slices) == 1:
        rows = _bmm_product(_im2col(spec, x)[0], kernels_of(slices[0]), bias)
    else:
        rows = x.new_empty(x.shape[0], out_h * out_w, spec.tiling.weight_shape[0])
        for part in slices:
            rows[part] = _bmm_product(_im2col(spec, x[part])[0], kernels_of(part), bias)
    return rows.view(x.shape[0], out_h, out_w, -1).permute(0, 3, 1, 2)


def _bmm_input_grad(grad_rows: Tensor, kernels: Tensor) -> Tensor:
    """``(B, L, K)``: the gradient of ``_bmm_product``'s im2col rows."""
    f_e = kernels.shape[3]
    grad_cols = torch.bmm(grad_rows[..., :f_e], kernels[:, 0].transpose(1, 2))
    for block in range(1, kernels.shape[1]):
        grad_cols.baddbmm_(grad_rows[..., block * f_e:(block + 1) * f_e], kernels[:, block].transpose(1, 2))
    return grad_cols


def _bmm_kernel_grad(cols: Tensor, grad_rows: Tensor, blocks_out: int) -> Tensor:
    """``(B, OB, K, f_e)``: the gradient of ``_bmm_product``'s kernels, written in place
    per output block (the layout ``_block_kernels`` reads, so no permutation follows)."""
    batch, length, out_channels = grad_rows.shape
    f_e = out_channels // blocks_out
    rows = cols.transpose(1, 2)
    if blocks_out == 1:
        return torch.bmm(rows, grad_rows).unsqueeze(1)
    if torch.compiler.is_compiling():  # a graph takes no strided out=: one product, then the layout
        return torch.bmm(rows, grad_rows).view(batch, rows.shape[1], blocks_out, f_e).transpose(1, 2).contiguous()
    grad = grad_rows.new_empty(batch, blocks_out, rows.shape[1], f_e)
    for block in range(blocks_out):
        torch.bmm(rows, grad_rows[..., block * f_e:(block + 1) * f_e], out=grad[:, block])
    return grad


#: Bytes of kernels the batched path (``"bmm"``) assembles at a time in training: the batch
#: goes through forward and backward in slices of samples whose kernels fit.  Whole-batch
#: products on resnet18's layer4 at batch 16 (151 MB of kernels, of their gradients) ran
#: 1.3-2x slower than in slices of 2-4 samples (fresh pages for every big temporary, and
#: a batch of kernels that leaves the caches between the products that read it), and never
#: holding a whole batch of kernels lowers the peak memory of the step.
BATCHED_SLICE_BYTES = 32 << 20


def _batch_slices(batch: int, sample_bytes: int) -> list[slice]:
    step = max(1, BATCHED_SLICE_BYTES // max(1, sample_bytes))
    return [slice(start, start + step) for start in range(0, batch, step)]


@_keeps_autocast
class _KWConv2dBatched(torch.autograd.Function):
    """Assembly and convolution as one autograd node, every product batched (path ``"bmm"``).

    The per-sample paths (``"matmul"``, ``"conv"``) call one small product per sample, which
    on small maps (28 x 28 / 32 x 32 inputs, batch 64: 7 x 7 and 4 x 4 maps in the late
    stages) costs more in calls than in arithmetic.  Here the assembly writes every kernel
    straight in the ``(K, f_e)`` order a batched product reads, per output block (alpha's
    mixtures re-ordered output block first and the warehouse's cells transposed,
    ``_block_kernels``), and forward and backward are one ``torch.bmm`` per output block
    each way plus the im2col: nothing the size of a batch of kernels is ever permuted
    (on a 4 x 4 map those permutations, forward and backward, took a fifth of the layer's
    training step).  The batch runs in slices (``BATCHED_SLICE_BYTES``).  Like the fused
    per-sample paths it saves only alpha, the warehouse and the input, and assembles the
    kernels again in backward unless they are small.
    """

    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor, cells: Tensor, bias: Tensor | None, spec: ConvSpec) -> Tensor:
        ctx.spec = spec
        tiling = spec.tiling
        batch = alpha.shape[0]
        columns = panel_ordered(cells, tiling.cell[0]).t()  # (c_e * f_e, n): each cell transposed
        alpha = _block_major(tiling, alpha)
        sample_bytes = math.prod(tiling.weight_shape) * cells.element_size()
        keep = ctx.needs_input_grad[0] and batch * sample_bytes <= _keep_limit(x)
        if keep:
            kernels = _block_kernels(tiling, F.linear(alpha, columns))
            ctx.save_for_backward(x, alpha, cells, kernels)
            return _bmm_forward(spec, x, lambda part: kernels, bias, [slice(0, batch)])
        ctx.save_for_backward(x, alpha, cells, None)
        return _bmm_forward(spec, x, lambda part: _block_kernels(tiling, F.linear(alpha[part], columns)), bias,
                            _batch_slices(batch, sample_bytes))

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, alpha, cells, kept = ctx.saved_tensors  # alpha: block major (_block_major)
        spec, tiling = ctx.spec, ctx.spec.tiling
        need_x, need_alpha, need_cells, need_bias = ctx.needs_input_grad[:4]
        batch, mixtures, n = alpha.shape
        f_e, c_e = tiling.cell[:2]
        columns = panel_ordered(cells, f_e)  # (n, c_e * f_e)
        grad_rows = grad.permute(0, 2, 3, 1).reshape(batch, -1, grad.shape[1])  # (B, L, C_out)
        grad_x = torch.empty_like(x, memory_format=torch.channels_last) if need_x else None
        grad_alpha = torch.empty_like(alpha) if need_alpha else None
        grad_columns = columns.new_zeros(columns.shape) if need_cells else None
        slices = [slice(0, batch)] if kept is not None else \
            _batch_slices(batch, math.prod(tiling.weight_shape) * cells.element_size())
        for part in slices:
            if need_x:
                kernels = kept if kept is not None else \
                    _block_kernels(tiling, F.linear(alpha[part], columns.t()))
                grad_x[part] = _col2im(spec, _bmm_input_grad(grad_rows[part], kernels), x[part].shape)
                kernels = None  # noqa: F841 (release the slice's kernels before the next products)
            if need_alpha or need_cells:
                grad_blocks = _bmm_kernel_grad(_im2col(spec, x[part])[0], grad_rows[part], tiling.blocks_out)
                grad_blocks = grad_blocks.view(-1, columns.shape[1])  # (slice * m, c_e * f_e)
                if need_alpha:
                    grad_alpha[part] = F.linear(grad_blocks, columns).view(-1, mixtures, n)
                if need_cells:
                    grad_columns.addmm_(alpha[part].reshape(-1, n).t(), grad_blocks)
        if need_alpha:
            grad_alpha = _block_major(tiling, grad_alpha, inverse=True)
        grad_cells = None
        if need_cells:
            grad_cells = grad_columns.view(n, c_e, f_e).transpose(1, 2).reshape(cells.shape)
        grad_bias = grad.sum(dim=(0, 2, 3)) if need_bias else None
        return grad_x, grad_alpha, grad_cells, grad_bias, None


# --- the compiled kernel in training ---------------------------------------------------------


@_keeps_autocast
class _KWConv2dInline(torch.autograd.Function):
    """Path ``"inline"`` in training: forward and backward in the compiled kernel, assembly inside.

    Forward is ``native.inline_conv``; backward takes the forward's im2col (kept up to the bytes a
    path may keep, ``_keep_limit``: the 28 x 28 net's training step 0.99x the time) or gathers it
    again transposed, and runs
    ``native.inline_input_grad`` (the rows' gradient, kernels mixed transposed chunk by chunk)
    and ``native.inline_weight_grad`` (each sample's kernel gradient a chunk at a time, turned at
    once into alpha's and the warehouse's).  No batch of kernels or of kernel gradients exists at
    any point, where ``"bmm"`` writes both and reads them back through three library products with
    an inner size of n.  Takes the warehouse as the packed rows it reads
    (``assembly.training_rows``) and returns their gradient in that layout, or adds it into the
    sum the backward pass's layers share (``rows_gradient``) and returns none; the cells ride
    along for the input gradient's second copy (no gradient of their own).  Saves the input,
    alpha, the warehouse and maybe the im2col.
    """

    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor, rows: Tensor, bias: Tensor | None, spec: ConvSpec,
                cells: Tensor, rows_gradient: RowsGradient | None) -> Tensor:
        ctx.spec, ctx.rows_gradient = spec, rows_gradient
        out_h, out_w = spec.output_size(*x.shape[2:])
        cols = _im2col(spec, x)[0]
        kept = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        kept = kept and cols.numel() * cols.element_size() <= _keep_limit(x)
        ctx.save_for_backward(x, alpha, rows, cells, cols if kept else None)
        out = native.inline_conv(spec.tiling, cols, alpha, rows, bias)
        return out.view(x.shape[0], out_h, out_w, -1).permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, alpha, rows, cells, cols = ctx.saved_tensors
        spec, tiling = ctx.spec, ctx.spec.tiling
        need_x, need_alpha, need_rows, need_bias = ctx.needs_input_grad[:4]
        grad_rows = grad.permute(0, 2, 3, 1).reshape(x.shape[0], -1, grad.shape[1])  # (B, L, C_out)
        grad_x = grad_alpha = grad_rows_of_cells = grad_bias = None
        if need_x:
            warehouse = rows if _one_copy(cells) else cached_inline(cells, native.input_width(tiling), "columns")
            grad_x = _col2im(spec, native.inline_input_grad(tiling, grad_rows, alpha, warehouse), x.shape)
        if need_alpha or need_rows:
            shared = ctx.rows_gradient if need_rows else None
            total = None if shared is None else shared.sum_so_far()
            cols_t = _im2col_t(spec, x) if cols is None else cols.transpose(1, 2)
            grad_alpha, grad_rows_of_cells = native.inline_weight_grad(tiling, cols_t, grad_rows, alpha, rows,
                                                                       into=total)
            grad_alpha = grad_alpha if need_alpha else None
            if not need_rows or total is not None:  # none asked for, or added into the pass's sum
                grad_rows_of_cells = None
            elif shared is not None:  # the pass's first: the others add into it
                shared.started(grad_rows_of_cells)
        if need_bias:
            grad_bias = grad.sum(dim=(0, 2, 3))
        return grad_x, grad_alpha, grad_rows_of_cells, grad_bias, None, None, None


#: A warehouse of more bytes than this trains "inline" on one packed copy: its input gradient
#: reads the forward's (the kernel transposes what it mixes), not a copy of its own, which would
#: live through the training step's peak (resnet50 at batch 8: 85 MB for stage 4, peak RSS
#: 1534 -> 1447 MB, median of 3 processes).  That gradient takes 4-10 % longer, which packing one
#: copy fewer makes up for (resnet18's training step at batch 16: 1.003x); on the few cells of a
#: 28 x 28 net's warehouses (13-22 % longer) a second copy costs under 2 MB.
ONE_COPY_BYTES = 16 << 20


def _one_copy(cells: Tensor) -> bool:
    return cells.numel() * cells.element_size() > ONE_COPY_BYTES


# --- mixing the inputs instead of the kernels (late stages of small images) ------------------


def _premix_alpha(tiling: Tiling, alpha: Tensor) -> Tensor:
    """alpha ``(B, m, n)`` as ``(B, OB * n, S * IB)``: per output block and cell, the
    attention of every (kernel position, input block) mixture, in the im2col's K order."""
    batch, _, n = alpha.shape
    grid = alpha.reshape(batch, tiling.spatial, tiling.blocks_out, tiling.blocks_in, n)
    return grid.permute(0, 2, 4, 1, 3).reshape(batch, tiling.blocks_out * n, tiling.spatial * tiling.blocks_in)


def _premix_alpha_grad(tiling: Tiling, grad_weights: Tensor) -> Tensor:
    """The gradient of ``_premix_alpha``'s input from its output's: ``(B, OB * n, S * IB)`` as ``(B, m, n)``."""
    batch, rows, _ = grad_weights.shape
    n = rows // tiling.blocks_out
    grid = grad_weights.view(batch, tiling.blocks_out, n, tiling.spatial, tiling.blocks_in)
    return grid.permute(0, 3, 1, 4, 2).reshape(batch, -1, n)


def _premix_rows(spec: ConvSpec, cols: Tensor, alpha: Tensor) -> Tensor:
    """The product's rows from the im2col: every pixel's inputs mixed per cell,
    ``(B * OB * L, n * c_e)`` laid out ``(B, OB, L, n, c_e)``."""
    return native.premix(cols, _premix_alpha(spec.tiling, alpha), alpha.shape[2], spec.tiling.cell[1])


def _premix_warehouse(cells: Tensor, f_e: int) -> Tensor:
    """The warehouse stacked ``(n * c_e, f_e)``, rows (cell, input channel): the product's right side."""
    return panel_ordered(cells, f_e).view(cells.shape[0] * cells.shape[2], f_e)


def _premix_product(spec: ConvSpec, mixed: Tensor, cells: Tensor, bias: Tensor | None, x_shape: torch.Size
                    ) -> Tensor:
    """``y = sum_j (sum_i alpha_ij x_i) e_j^T`` from the mixed inputs: one product with the whole
    warehouse (see ``_KWConv2dPremixed``)."""
    tiling = spec.tiling
    batch, f_e = x_shape[0], tiling.cell[0]
    out_h, out_w = spec.output_size(x_shape[2], x_shape[3])
    length = out_h * out_w
    warehouse = _premix_warehouse(cells, f_e)
    if tiling.blocks_out == 1 and bias is not None:
        out = torch.addmm(bias, mixed, warehouse)
    else:
        out = torch.mm(mixed, warehouse)
    out = out.view(batch, tiling.blocks_out, length, f_e).transpose(1, 2).reshape(batch, out_h, out_w, -1)
    if tiling.blocks_out > 1 and bias is not None:
        out = out + bias
    return out.permute(0, 3, 1, 2)


def _premix_forward(spec: ConvSpec, x: Tensor, alpha: Tensor, cells: Tensor, bias: Tensor | None) -> Tensor:
    """The ``"premix"`` convolution outside autograd: the inputs mixed per cell, then the product."""
    return _premix_product(spec, _premix_rows(spec, _im2col(spec, x)[0], alpha), cells, bias, x.shape)


@_keeps_autocast
class _KWConv2dPremixed(torch.autograd.Function):
    """The convolution without assembling any kernel (path ``"premix"``).

    Each mixture i (kernel position s, output block o, input block ib) is
    ``w_i = sum_j alpha_ij e_j``, so a sample's output block o is
    ``sum_j (sum_(s, ib) alpha_(s,o,ib),j X_(s,ib)) e_j^T``: every pixel's im2col row is mixed per
    cell with the attentions (``native.premix``: sums of S * IB terms), then multiplied by the
    warehouse stacked ``(n * c_e, f_e)`` in one plain product over the whole batch.  It costs
    ``L * n * (K * OB + c_e * C_out)`` multiply-adds per sample against
    ``n * K * C_out + L * K * C_out`` for assembling the kernels and convolving (L output
    pixels, K = kh * kw * C_in): less where L is small (the 4 x 4 and 7 x 7 maps of 28 x 28
    images), and it never writes a batch of kernels (B x C_out x K floats, far more than
    such a map's activations).  Saves alpha, the warehouse and the input, and, up to the bytes
    a path may keep (``KEEP_KERNELS_BYTES``), the im2col and the mixed inputs, which the
    gradients of alpha and the warehouse read: kept, the backward neither gathers nor mixes
    again (the 28 x 28 net's 4 x 4 layer at batch 64, 9.4 MB: 0.89x its forward and backward).
    """

    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor, cells: Tensor, bias: Tensor | None, spec: ConvSpec) -> Tensor:
        ctx.spec = spec
        cols = _im2col(spec, x)[0]
        mixed = _premix_rows(spec, cols, alpha)
        # the gradient of alpha reads the im2col, the warehouse's the mixed inputs
        need_cols, need_mixed = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        kept = (cols.numel() * need_cols + mixed.numel() * need_mixed) * mixed.element_size() <= _keep_limit(x)
        ctx.save_for_backward(x, alpha, cells, cols if kept and need_cols else None,
                              mixed if kept and need_mixed else None)
        return _premix_product(spec, mixed, cells, bias, x.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, alpha, cells, cols, mixed = ctx.saved_tensors
        spec, tiling = ctx.spec, ctx.spec.tiling
        need_x, need_alpha, need_cells, need_bias = ctx.needs_input_grad[:4]
        if cols is None and (need_alpha or (need_cells and mixed is None)):
            cols = _im2col(spec, x)[0]
        if mixed is None and need_cells:
            mixed = _premix_rows(spec, cols, alpha)
        batch, _, n = alpha.shape
        f_e, c_e = tiling.cell[:2]
        blocks_out = tiling.blocks_out
        length = grad.shape[2] * grad.shape[3]
        # the output's gradient as the product's rows (B * OB * L, f_e)
        grad_rows = grad.permute(0, 2, 3, 1).reshape(batch, length, blocks_out, f_e).transpose(1, 2)
        grad_rows = grad_rows.reshape(batch * blocks_out * length, f_e)
        grad_x = grad_alpha = grad_cells = grad_bias = None
        if need_cells:
            grad_cells = torch.mm(mixed.t(), grad_rows).view(n, c_e, f_e).transpose(1, 2).reshape(cells.shape)
        if need_x or need_alpha:
            grad_mixed = torch.mm(grad_rows, _premix_warehouse(cells, f_e).t())  # (B * OB * L, n * c_e)
            if need_alpha:
                grad_alpha = _premix_alpha_grad(tiling, native.premix_weight_grad(grad_mixed, cols, n, c_e))
            if need_x:
                grad_cols = native.premix_input_grad(grad_mixed, _premix_alpha(tiling, alpha), length, c_e)
                grad_x = _col2im(spec, grad_cols, x.shape)
        if need_bias:
            grad_bias = grad.sum(dim=(0, 2, 3))
        return grad_x, grad_alpha, grad_cells, grad_bias, None


# --- entry points used by layers.py --------------------------------------------------------


def _padded(layer, x: Tensor) -> Tensor:
    """``x`` padded where the padding mode is not zeros (``_spec_for`` then pads with nothing)."""
    if layer.padding_mode != "zeros":
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
    return x


def _spec_for(layer, path: str) -> ConvSpec:
    """The fused node's geometry; non-zero padding modes are applied before (see conv2d)."""
    if layer.padding_mode == "zeros":
        left, right, top, bottom = layer._reversed_padding_repeated_twice
    else:
        left = right = top = bottom = 0
    return ConvSpec(layer.tiling, tuple(layer.kernel_size), tuple(layer.stride), tuple(layer.dilation),
                    (top, bottom, left, right), layer.groups, path)


def _available(layer, x: Tensor) -> tuple[str, ...]:
    if x.device.type != "cpu":
        return ("grouped",)  # the per-sample paths are tuned for oneDNN on CPU
    if tuple(layer.warehouse.cell[2:]) != (1,) * (len(layer.warehouse.cell) - 2):
        return ("grouped",)  # cells spanning several kernel positions: only the generic path
    compiled = (("native", "inline") if layer.groups == 1 else ("native",)) \
        if native.supports(layer.tiling, layer.groups, x) else ()
    # "premix" sums the inputs mixed per cell: in bfloat16 (autocast or a bfloat16 model) its
    # cells' gradients strayed (cosine 0.74 with float32's, the other paths 0.99)
    premix = ("premix",) if x.dtype != torch.bfloat16 and not torch.is_autocast_enabled(x.device.type) else ()
    if layer.groups == 1:  # "folded" measured no faster on resnet18 / mobilenet_v2's dense layers
        return ("grouped", "conv", "matmul", "bmm") + premix + compiled
    return ("grouped", "folded", "conv") + compiled


def _grouped(layer, x: Tensor, alpha: Tensor) -> Tensor:
    """The reference's convolution (the batch folded into the groups) on fast-assembled kernels."""
    return layer._add_bias(layer._per_sample_conv(x, layer.assemble_kernels(alpha)), channel_dim=1)


def _folded(layer, x: Tensor, alpha: Tensor) -> Tensor:
    """The batch folded into the channels of one channels-last image, one grouped convolution.

    ``(B, C, H, W)`` is laid out as ``(H, W, B, C)``: a batch-1 channels-last image of
    ``B * C`` channels, which oneDNN convolves with ``B * groups`` groups as one depthwise
    (or grouped) layer, where the NCHW batch folding of ``"grouped"`` is 2-4x slower.  The
    output is copied back to channels-last: left in ``(H, W, B, C)`` order, the norm, the
    activation and the next attention's pooling ran slower than the copy costs.
    """
    if layer.padding_mode != "zeros":
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        padding = 0
    else:
        padding = layer.padding
    batch, channels, height, width = x.shape
    image = x.permute(2, 3, 0, 1).reshape(1, height, width, batch * channels).permute(0, 3, 1, 2)
    weight = layer.assemble_kernels(alpha).reshape(batch * layer.out_channels, *layer.weight_shape[1:])
    out = F.conv2d(image, weight, None, layer.stride, padding, layer.dilation, batch * layer.groups)
    out_h, out_w = out.shape[2:]
    out = out.permute(0, 2, 3, 1).reshape(out_h, out_w, batch, layer.out_channels).permute(2, 3, 0, 1)
    return layer._add_bias(out.contiguous(memory_format=torch.channels_last), channel_dim=1)


def _fused(layer, x: Tensor, alpha: Tensor, path: str) -> Tensor:
    x, spec = _padded(layer, x), _spec_for(layer, path)
    x = x.contiguous(memory_format=torch.channels_last)
    cells = layer.warehouse.cells
    if not _needs_grad(x, alpha, cells, layer.bias):  # inference: no autograd node, packed warehouse
        if path == "premix":
            return _premix_forward(spec, x, alpha, cells, layer.bias)
        if path == "bmm":
            blocks = _assembled(spec.tiling, _block_major(spec.tiling, alpha), cells, pack=True,
                                panels=spec.tiling.cell[0])
            return _bmm_forward(spec, x, lambda part: _block_kernels(spec.tiling, blocks), layer.bias,
                                [slice(0, x.shape[0])])
        kernels = _Kernels(spec.tiling, _assembled(spec.tiling, alpha, cells, pack=True))
        return _FORWARD[path](spec, x, kernels, layer.bias)
    if path == "bmm":
        return _KWConv2dBatched.apply(x, alpha, cells, layer.bias, spec)
    if path == "premix":
        return _KWConv2dPremixed.apply(x, alpha, cells, layer.bias, spec)
    return _KWConv2d.apply(x, alpha, cells, layer.bias, spec)


def _native(layer, x: Tensor, alpha: Tensor, inline: bool = False) -> Tensor:
    """Inference through the compiled kernel (:mod:`.native`), which reads each
    sample's kernel where the assembly leaves it: for a dense layer the warehouse is packed
    in the kernel's panel order; a depthwise layer's blocks are in its order already.
    ``inline``: the kernel assembles the kernels itself, chunk by chunk (dense layers)."""
    x, spec = _padded(layer, x), _spec_for(layer, "native")
    x = x.contiguous(memory_format=torch.channels_last)
    cells = layer.warehouse.cells
    if layer.groups > 1:
        top, _, left, _ = spec.padding
        return native.depthwise(x, _assembled(spec.tiling, alpha, cells, pack=True), layer.bias, spec.stride,
                                (top, left), spec.dilation, spec.kernel, spec.output_size(*x.shape[2:]))
    out_h, out_w = spec.output_size(*x.shape[2:])
    dense = _native_inline if inline else _native_dense
    symbolic = torch.compiler.is_compiling() or torch.compiler.is_exporting()  # no loop over a symbolic batch
    step = x.shape[0] if symbolic else _native_slice(spec, x, out_h * out_w, kernels=not inline)
    if step >= x.shape[0]:  # one call: no views of a batch that fits it
        out = dense(layer, spec, x, alpha)
    else:
        out = torch.cat([dense(layer, spec, x[start:start + step], alpha[start:start + step])
                         for start in range(0, x.shape[0], step)])
    return out.view(x.shape[0], out_h, out_w, -1).permute(0, 3, 1, 2)


#: Bytes of temporaries (im2col columns and assembled kernels) one call of the compiled kernel
#: may allocate.  glibc returns a freed block above 32 MB to the system at once and the next
#: call page-faults it in again; a whole batch's columns or kernels pass that (resnet18 at
#: batch 16: 115 MB of columns in layer1, 151 MB of kernels in layer4).  In slices, a process
#: with glibc's default settings ran that forward in 1765 ms instead of 1996 (1562 vs 1666 in
#: a second pair of processes).
NATIVE_SLICE_BYTES = 16 << 20


def _native_slice(spec: ConvSpec, x: Tensor, rows: int, kernels: bool = True) -> int:
    """Samples per call of the compiled kernel: as many as ``NATIVE_SLICE_BYTES`` of
    temporaries (columns, and ``kernels``: the assembled kernels) allow (at least one)."""
    per_sample = (rows * math.prod(spec.tiling.weight_shape[1:])
                  + (math.prod(spec.tiling.weight_shape) if kernels else 0)) * x.element_size()
    return max(1, NATIVE_SLICE_BYTES // per_sample)


def _native_dense(layer, spec: ConvSpec, x: Tensor, alpha: Tensor) -> Tensor:
    """``(B, rows, C_out)``: the samples' kernels assembled in panel order, then the product."""
    blocks = _assembled(spec.tiling, alpha, layer.warehouse.cells, pack=True, panels=native.panel_width(spec.tiling))
    cols, _ = _im2col(spec, x)
    return native.conv(spec.tiling, cols, blocks, layer.bias)


def _train_inline(layer, x: Tensor, alpha: Tensor) -> Tensor:
    x, spec = _padded(layer, x), _spec_for(layer, "inline")
    cells = layer.warehouse.cells
    rows, rows_gradient = training_rows(cells, native.panel_width(spec.tiling))
    return _KWConv2dInline.apply(x.contiguous(memory_format=torch.channels_last), alpha, rows, layer.bias, spec,
                                 cells, rows_gradient)


def _native_inline(layer, spec: ConvSpec, x: Tensor, alpha: Tensor) -> Tensor:
    """``(B, rows, C_out)``: the product with the assembly inside the compiled kernel."""
    cols, _ = _im2col(spec, x)
    return inline_product(spec.tiling, cols, alpha, layer.warehouse.cells, layer.bias)


def _inline_trains(layer, x: Tensor) -> bool:
    """Whether ``"inline"`` can run this layer's backward too (``native.input_width``)."""
    return layer.groups == 1 and native.input_width(layer.tiling) is not None and x.dtype == torch.float32 \
        and not torch.is_autocast_enabled(x.device.type)


def _run(layer, x: Tensor, alpha: Tensor, path: str) -> Tensor:
    if path in ("native", "inline"):
        if _needs_grad(x, alpha, layer.warehouse.cells, layer.bias):
            if path == "inline" and _inline_trains(layer, x):
                if torch.compiler.is_compiling():  # the operator, whose autograd runs the same kernels
                    return _native(layer, x, alpha, inline=True)
                return _train_inline(layer, x, alpha)
            # "native" is inference only: with a gradient to compute, an autograd path
            return _fused(layer, x, alpha, "matmul") if layer.groups == 1 else _grouped(layer, x, alpha)
        return _native(layer, x, alpha, inline=path == "inline")
    if path == "grouped":
        return _grouped(layer, x, alpha)
    if path == "folded":
        return _folded(layer, x, alpha)
    return _fused(layer, x, alpha, path)


def linear_layer(layer, rows: Tensor, alpha: Tensor) -> Tensor:
    """A KWLinear's output ``(B, L, out)`` for rows ``(B, L, in)``: a 1x1 convolution over
    the L rows of each sample, so the rows are the matrix and no copy is made."""
    batch, length, features = rows.shape
    image = rows.transpose(1, 2).unsqueeze(-1)  # (B, in, L, 1), channels-last strides
    tiling = Tiling(layer.weight_shape + (1, 1), layer.warehouse.cell + (1, 1))
    spec = ConvSpec(tiling, (1, 1), (1, 1), (1, 1), (0, 0, 0, 0), 1, "matmul")
    image = image.contiguous(memory_format=torch.channels_last)
    cells = layer.warehouse.cells
    if not _needs_grad(image, alpha, cells, layer.bias):
        if native.supports(tiling, 1, rows) and execution.forced() in (None, "native"):
            blocks = _assembled(tiling, alpha, cells, pack=True, panels=native.panel_width(tiling))
            return native.conv(tiling, rows.contiguous(), blocks, layer.bias)
        kernels = _Kernels(tiling, _assembled(tiling, alpha, cells, pack=True))
        out = _matmul_forward(spec, image, kernels, layer.bias)
    else:
        out = _KWConv2d.apply(image, alpha, cells, layer.bias, spec)
    return out.squeeze(-1).transpose(1, 2)
