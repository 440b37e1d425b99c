"""Convolutions whose kernel differs per sample: the geometry and the convolution itself.

Every dynamic-convolution method kwconvert converts to (KernelWarehouse, ODConv, KernelDNA) ends the
same way: each sample of the batch has its own kernel ``(B, C_out, C_in/g, *k)``, and the
layer convolves each sample with it.  :class:`PerSampleConv` holds what those layers
share: torch's ConvNd arguments (checked as torch checks them, with the layer named) and
the two ways to run the per-sample convolution:

* the batch folded into the groups (one grouped convolution: fast in eager);
* im2col and one batched matrix product (``use_path("im2col")``): no op attribute depends
  on the batch, so ``torch.export`` and ONNX keep the batch dynamic.

It also holds what keeps such a layer's input gradient in its input's memory format
(``spatial_mean``, ``grad_in_input_format``).
"""
from __future__ import annotations

import math
import operator
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import execution

#: Padding modes of torch's convolutions, all supported.
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


# --- gradients in the input's memory format ---------------------------------------------------
#
# A dynamic layer reads its input twice, once pooled for the attention and once convolved.  Each
# branch's gradient comes back in whatever memory format its ops produce (the pooling's broadcast:
# NCHW; a compiled product's: channels-last), while the layers around keep the format of their own
# activations.  Where a gradient meets a saved activation of the other format, torch's elementwise
# and BatchNorm backward kernels take a strided path: on mobilenet_v2's 96 x 112 x 112 maps at batch
# 16 a BatchNorm backward took 163 ms against 36 for matched formats, a ReLU6 backward 155 against
# 33, and a KW training step of the whole net 2.5x the plain one.  So each branch hands its
# gradient back in the format of the input it read.


def _memory_format(x: Tensor) -> torch.memory_format:
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


class _SpatialMean(torch.autograd.Function):
    """``x.mean`` over the spatial dims (2 onwards), whose gradient, the broadcast of the pooled
    gradient, is written once in ``x``'s memory format, or (``in_format`` False) left a
    broadcast view, for autograd to add to the other branch's gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, in_format: bool) -> Tensor:
        ctx.shape, ctx.memory_format = x.shape, _memory_format(x) if in_format else None
        return x.mean(dim=tuple(range(2, x.dim())))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        count = math.prod(ctx.shape[2:])
        spread = (grad / count).view(*grad.shape, *(1,) * (len(ctx.shape) - 2)).expand(ctx.shape)
        return (spread if ctx.memory_format is None else spread.contiguous(memory_format=ctx.memory_format)), None


def spatial_mean(x: Tensor, gradient_in_format: bool = True) -> Tensor:
    """``x (B, C, *spatial)`` averaged over its spatial dims ``(B, C)``: what a dynamic layer's
    attention reads; its gradient comes back in ``x``'s memory format.

    ``gradient_in_format=False``: the gradient is the broadcast view, never written out, for a
    layer whose convolution branch hands its own gradient back in ``x``'s format
    (``grad_in_input_format``): autograd adds the view to it and the sum keeps that format.
    Written out, it was one more tensor of ``x``'s size per layer and training step (the
    28 x 28 net's step: 0.96-1.0x the time without it, mobilenet_v2's at batch 16 0.98x,
    interleaved in one process on a noisy host).
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return _SpatialMean.apply(x, gradient_in_format)
    return x.mean(dim=tuple(range(2, x.dim())))


class _GradInFormat(torch.autograd.Function):
    """The identity, whose gradient is put in the input's memory format (a copy only where the
    gradient came back in the other one)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.memory_format = _memory_format(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous(memory_format=ctx.memory_format)


def grad_in_input_format(x: Tensor) -> Tensor:
    """``x``, for a branch whose gradient must come back in ``x``'s memory format (a 4-d input)."""
    if x.dim() == 4 and torch.is_grad_enabled() and x.requires_grad:
        return _GradInFormat.apply(x)
    return x


def as_tuple(value, dims: int, what: str, label: str) -> tuple[int, ...]:
    """``value`` (one int or ``dims`` of them) as ``dims`` ints, as torch's ConvNd takes it."""
    values = tuple(value) if isinstance(value, Sequence) else (value,)
    if len(values) == 1:
        values = values * dims
    if len(values) != dims:
        raise ValueError(f"{label}: {what} {value} needs 1 or {dims} values")
    return tuple(operator.index(v) for v in values)


def explicit_padding(padding: str | tuple[int, ...], kernel_size: tuple[int, ...],
                     dilation: tuple[int, ...]) -> tuple[int, ...]:
    """F.pad amounts (last dim first, left then right), computed as torch's ConvNd does.

    'same' puts the odd extra pixel of an even kernel on the right, like torch.
    """
    if padding == "valid":
        pairs = [(0, 0)] * len(kernel_size)
    elif padding == "same":
        totals = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
        pairs = [(total // 2, total - total // 2) for total in totals]
    else:
        pairs = [(p, p) for p in padding]
    return tuple(amount for pair in reversed(pairs) for amount in pair)


def layer_label(name: str, layer_type: type) -> str:
    """How errors name a layer: ``layer layer1.0.conv1``, or its class when it has no name."""
    return f"layer {name}" if name else f"layer {layer_type.__name__}"


def check_conv(label: str, in_channels: int, out_channels: int, groups: int, padding, stride,
               padding_mode: str) -> None:
    """The argument checks torch's ConvNd makes, with the layer named."""
    if groups < 1 or in_channels % groups or out_channels % groups:
        raise ValueError(f"{label}: in_channels {in_channels} and out_channels {out_channels} "
                         f"must be divisible by groups {groups}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"{label}: padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"{label}: padding must be 'same', 'valid' or numbers, got {padding!r}")
        if padding == "same" and any(s != 1 for s in stride):
            raise ValueError(f"{label}: padding='same' is not supported for strided convolutions "
                             f"(stride {stride})")


class Rank1:
    """The torch layer and functional of a 1-D convolution (mixed into a layer class)."""
    _spatial_dims = 1
    _conv = F.conv1d
    _static_type = nn.Conv1d


class Rank2:
    """The torch layer and functional of a 2-D convolution."""
    _spatial_dims = 2
    _conv = F.conv2d
    _static_type = nn.Conv2d


class Rank3:
    """The torch layer and functional of a 3-D convolution."""
    _spatial_dims = 3
    _conv = F.conv3d
    _static_type = nn.Conv3d


class PerSampleConv:
    """Mixin of a ConvNd-like layer whose kernel is given per sample.

    Concrete layers mix in :class:`Rank1` / :class:`Rank2` / :class:`Rank3` (``_spatial_dims``,
    ``_conv``, ``_static_type``), have a ``name`` and call :meth:`_set_geometry` in their
    ``__init__``.
    """

    _spatial_dims: int
    _conv: Callable[..., Tensor]
    name: str

    @property
    def _label(self) -> str:
        return layer_label(self.name, type(self))

    def _set_geometry(self, label: str, in_channels: int, out_channels: int, kernel_size, stride, padding,
                      dilation, groups: int, padding_mode: str) -> None:
        dims = self._spatial_dims
        self.kernel_size = as_tuple(kernel_size, dims, "kernel_size", label)
        self.stride = as_tuple(stride, dims, "stride", label)
        self.dilation = as_tuple(dilation, dims, "dilation", label)
        self.padding = padding if isinstance(padding, str) else as_tuple(padding, dims, "padding", label)
        check_conv(label, in_channels, out_channels, groups, self.padding, self.stride, padding_mode)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.groups, self.padding_mode = groups, padding_mode
        self._reversed_padding_repeated_twice = explicit_padding(self.padding, self.kernel_size, self.dilation)

    @property
    def per_sample_shape(self) -> tuple[int, ...]:
        """One sample's kernel: ``(C_out, C_in / groups, *kernel_size)``."""
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def _check_input(self, x: Tensor) -> tuple[Tensor, bool]:
        """``x`` batched (an unbatched sample gains a batch of one), and whether it was unbatched."""
        unbatched = x.dim() == self._spatial_dims + 1
        if unbatched:
            x = x.unsqueeze(0)
        if x.dim() != self._spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"{self._label}: expected input (B, {self.in_channels}, ...) with "
                             f"{self._spatial_dims} spatial dims, got {tuple(x.shape)}")
        return x, unbatched

    def _empty_batch(self, x: Tensor) -> Tensor:
        """The output of an empty batch (a detection head given no proposals), as torch's
        convolution returns it: empty, of the output's shape; no sample needs an attention or a
        kernel, and the per-sample paths cannot split a batch of none."""
        return self._shared_conv(x, x.new_zeros(self.per_sample_shape))

    def _convolve(self, x: Tensor, weight: Tensor, groups: int) -> Tensor:
        """torch's convolution with this layer's geometry; padding modes other than zeros pad first."""
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return type(self)._conv(x, weight, None, self.stride, padding, self.dilation, groups)

    def _shared_conv(self, x: Tensor, weight: Tensor) -> Tensor:
        """An ordinary convolution with one kernel for the whole batch."""
        return self._convolve(x, weight, self.groups)

    def _per_sample_conv(self, x: Tensor, weight: Tensor) -> Tensor:
        """Convolve each sample with its own kernel: the batch is folded into the groups.

        A channels-last input gives a channels-last output, as torch's convolution does: the
        folded batch is an NCHW image, and its output left NCHW met the channels-last
        activations around it in the norm, the activation and the residual sum, whose
        mixed-format kernels cost more than the copy (the 28 x 28 net's first stage, whose
        stem outputs channels-last: its training step 0.976-0.979x, interleaved in one process).
        """
        if execution.is_im2col():
            return self._im2col_conv(x, weight)
        batch = x.shape[0]
        folded = x.reshape(1, batch * self.in_channels, *x.shape[2:])
        weight = weight.reshape(batch * self.out_channels, *self.per_sample_shape[1:])
        out = self._convolve(folded, weight, batch * self.groups)
        out = out.view(batch, self.out_channels, *out.shape[2:])
        if _memory_format(x) == torch.channels_last:
            return out.contiguous(memory_format=torch.channels_last)
        return out

    def _im2col_conv(self, x: Tensor, weight: Tensor) -> Tensor:
        """``_per_sample_conv`` as im2col and one batched matrix product (``use_path("im2col")``).

        No op attribute depends on the batch, so ``torch.export`` and ONNX keep the batch
        dynamic, where the batch-folded groups would become a symbolic ``Conv`` attribute.
        ``Tensor.unfold`` cuts the windows one spatial dim at a time (a ``Gather`` in ONNX,
        a small graph for any kernel size); dilation keeps every d-th element of a window.
        """
        pads = self._reversed_padding_repeated_twice
        if any(pads):
            x = F.pad(x, pads, mode="constant" if self.padding_mode == "zeros" else self.padding_mode)
        windows = x
        for dim, (kernel, stride, dilation) in enumerate(zip(self.kernel_size, self.stride, self.dilation), start=2):
            windows = windows.unfold(dim, dilation * (kernel - 1) + 1, stride)  # window appended last
            if dilation > 1:
                windows = windows[..., ::dilation]
        rank = self._spatial_dims  # windows: (B, C_in, *out, *k); kernels: (C_out, C_in / groups, *k)
        out_size = windows.shape[2:2 + rank]
        windows = windows.permute(0, 1, *range(2 + rank, 2 + 2 * rank), *range(2, 2 + rank))
        batch, groups = x.shape[0], self.groups
        columns = windows.reshape(batch, groups, self.in_channels // groups * math.prod(self.kernel_size), -1)
        kernels = weight.reshape(batch, groups, self.out_channels // groups, -1)
        out = torch.matmul(kernels, columns)  # (B, groups, C_out / groups, L)
        return out.reshape(batch, self.out_channels, *out_size)

    def _geometry_repr(self) -> str:
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}")
        if self.dilation != (1,) * self._spatial_dims:
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if getattr(self, "bias", None) is None:
            text += ", bias=False"
        if self.padding_mode != "zeros":
            text += f", padding_mode={self.padding_mode}"
        return text
