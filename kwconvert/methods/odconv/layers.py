"""ODConv layers: omni-dimensional dynamic convolution, for Conv1d/2d/3d.

ODConv (Chao Li, Aojun Zhou and Anbang Yao, "Omni-Dimensional Dynamic Convolution",
ICLR 2022) keeps n kernels ``W_1..W_n`` per layer and an attention that looks at the
input once and scales the kernel along all four of its dimensions (paper Sec. 3.2, Eq. 4):

    h   = ReLU(BN(fc(GAP(x))))                         width d = max(int(C_in / 16), 16)
    y   = a_f * conv(a_c * x, sum_i a_w,i * (a_s ⊙ W_i)) + bias

with ``a_c`` (input channels), ``a_f`` (output filters), ``a_s`` (kernel positions) sigmoids
and ``a_w`` (kernels) a softmax of heads over ``h``, all divided by a temperature T.  A
head that would be constant is absent, as in the authors' code: ``a_f`` for depthwise
layers (``C_in = C_out = groups``), ``a_s`` for 1-point kernels, ``a_w`` for n = 1.

The heads are Linear layers on the pooled vector (the authors' 1x1 convolutions on a 1x1
map: the same parameters), so one module serves every rank.  Mixing the kernels before
the spatial scale (``a_s ⊙ sum_i a_w,i W_i``) is the same sum with n times fewer
products.  Where no per-sample kernel exists (n = 1 and a 1-point kernel: a pointwise
ODConv 1x) the layer is one ordinary convolution between two channel scalings.

A layer converted from a trained convolution starts as that convolution: every head's
weights and bias start at zero, so each sigmoid gives 1/2 and the softmax 1/n whatever
the input and temperature, and every kernel is the trained one times 2 per sigmoid head.
The n copies differ by a spread that sums to zero over the kernels (so the mixture is
exact at the start), which lets the kernel attention learn what the copies alone could
not: identical kernels would give its head no gradient, ever.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..common import batch_norm_any_batch
from ...per_sample import PerSampleConv, Rank1, Rank2, Rank3, spatial_mean

#: The authors' attention width: ``max(int(C_in * REDUCTION), MIN_HIDDEN)``.
REDUCTION = 1 / 16
MIN_HIDDEN = 16
#: The temperature the authors start training from scratch at, falling to 1 over
#: ``WARMUP_EPOCHS`` (updated every iteration); 1 afterwards and at evaluation.
START_TEMPERATURE = 30.0
WARMUP_EPOCHS = 10.0
#: Relative spread between the n copies of a trained kernel (of the kernel's RMS).
KERNEL_SPREAD = 0.1


def attention_width(in_channels: int, reduction: float = REDUCTION, min_hidden: int = MIN_HIDDEN) -> int:
    """The attention's hidden width d, as the authors' code computes it (truncating)."""
    return max(int(in_channels * reduction), min_hidden)


def is_depthwise(in_channels: int, out_channels: int, groups: int) -> bool:
    """The authors' test for dropping the filter head: one channel per group, in and out."""
    return in_channels == groups == out_channels


@dataclass(frozen=True)
class Heads:
    """Which of the four attentions a layer has (the channel one always)."""
    filter: bool
    spatial: bool
    kernel: bool

    @classmethod
    def of(cls, in_channels: int, out_channels: int, groups: int, kernel_points: int, kernels: int) -> "Heads":
        return cls(filter=not is_depthwise(in_channels, out_channels, groups), spatial=kernel_points > 1,
                   kernel=kernels > 1)

    @property
    def sigmoids(self) -> int:
        """Sigmoid heads (channel, filter, spatial): each halves a fresh layer's output."""
        return 1 + self.filter + self.spatial

    @property
    def names(self) -> tuple[str, ...]:
        return ("channel",) + tuple(name for name in ("filter", "spatial", "kernel") if getattr(self, name))


def layer_params(in_channels: int, out_channels: int, groups: int, kernel_size: tuple[int, ...], kernels: int,
                 hidden: int) -> int:
    """Parameters of one ODConv layer without bias (METHODS.md's formula, the authors' count)."""
    points = math.prod(kernel_size)
    heads = Heads.of(in_channels, out_channels, groups, points, kernels)
    count = kernels * out_channels * (in_channels // groups) * points
    count += in_channels * hidden + 2 * hidden + hidden * in_channels + in_channels
    count += (hidden * out_channels + out_channels) if heads.filter else 0
    count += (hidden * points + points) if heads.spatial else 0
    count += (hidden * kernels + kernels) if heads.kernel else 0
    return count


@dataclass
class Attentions:
    """One batch's attentions, ``(B, size)`` each; None where the head is absent."""
    channel: Tensor
    filter: Tensor | None
    spatial: Tensor | None
    kernel: Tensor | None


class ODAttention(nn.Module):
    """GAP -> fc -> BN -> ReLU -> the four heads, each divided by the temperature."""

    def __init__(self, in_channels: int, out_channels: int, kernel_points: int, kernels: int, hidden: int,
                 heads: Heads, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.temperature = 1.0
        self.fc = nn.Linear(in_channels, hidden, bias=False, **factory)
        self.norm = nn.BatchNorm1d(hidden, **factory)
        self.channel_fc = nn.Linear(hidden, in_channels, **factory)
        self.filter_fc = nn.Linear(hidden, out_channels, **factory) if heads.filter else None
        self.spatial_fc = nn.Linear(hidden, kernel_points, **factory) if heads.spatial else None
        self.kernel_fc = nn.Linear(hidden, kernels, **factory) if heads.kernel else None

    @property
    def heads(self) -> tuple[nn.Linear, ...]:
        return tuple(head for head in (self.channel_fc, self.filter_fc, self.spatial_fc, self.kernel_fc) if head)

    def forward(self, x: Tensor) -> Attentions:
        pooled = spatial_mean(x)
        hidden = F.relu(batch_norm_any_batch(self.norm, self.fc(pooled)))
        temperature = self.temperature

        def head(fc: nn.Linear | None, activation) -> Tensor | None:
            return None if fc is None else activation(fc(hidden) / temperature)

        return Attentions(channel=head(self.channel_fc, torch.sigmoid), filter=head(self.filter_fc, torch.sigmoid),
                          spatial=head(self.spatial_fc, torch.sigmoid),
                          kernel=head(self.kernel_fc, lambda logits: logits.softmax(dim=1)))


class _ODConvNd(PerSampleConv, nn.Module):
    """ODConv drop-in for a ConvNd (any rank); see the module docstring for the equation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *, kernels: int = 1,
                 hidden: int | None = None, name: str = "", device=None, dtype=None) -> None:
        super().__init__()
        self.name = name
        if kernels < 1:
            raise ValueError(f"{self._label}: ODConv needs at least one kernel, got kernels={kernels}")
        self._set_geometry(self._label, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                           padding_mode)
        self.kernels = kernels
        self.hidden = attention_width(in_channels) if hidden is None else hidden
        points = math.prod(self.kernel_size)
        self.heads = Heads.of(in_channels, out_channels, groups, points, kernels)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(kernels, *self.per_sample_shape, **factory))
        self.attention = ODAttention(in_channels, out_channels, points, kernels, self.hidden, self.heads, **factory)
        self.bias = nn.Parameter(torch.zeros(out_channels, **factory)) if bias else None
        self.reset_parameters()

    @property
    def temperature(self) -> float:
        """T of the heads' sigmoid / softmax (``logits / T``): 30 -> 1 from scratch, 1 after."""
        return self.attention.temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        value = float(value)
        if not value > 0 or not math.isfinite(value):
            raise ValueError(f"{self._label}: the ODConv temperature must be positive, got {value}")
        self.attention.temperature = value

    def reset_parameters(self) -> None:
        """The authors' from-scratch init: Kaiming normal (fan_out, ReLU) for every kernel and
        head, zero biases, the attention's BatchNorm at 1 / 0."""
        with torch.no_grad():
            for kernel in self.weight:
                nn.init.kaiming_normal_(kernel, mode="fan_out", nonlinearity="relu")
            attention = self.attention
            for fc in (attention.fc,) + attention.heads:
                nn.init.kaiming_normal_(fc.weight, mode="fan_out", nonlinearity="relu")
                if fc.bias is not None:
                    fc.bias.zero_()
            attention.norm.reset_parameters()
            if self.bias is not None:
                self.bias.zero_()

    def preserve(self, weight: Tensor, bias: Tensor | None, generator: torch.Generator | None = None) -> None:
        """Start as the static convolution ``(weight, bias)``: heads at zero, kernels scaled
        by 2 per sigmoid head, the n copies spread around it (see the module docstring)."""
        if tuple(weight.shape) != self.per_sample_shape:
            raise ValueError(f"{self._label}: kernel {tuple(weight.shape)} does not fit {self.per_sample_shape}")
        with torch.no_grad():
            for head in self.attention.heads:
                head.weight.zero_()
                head.bias.zero_()
            kernel = weight.to(self.weight) * 2.0 ** self.heads.sigmoids
            spread = torch.zeros_like(self.weight)
            if self.kernels > 1 and self.weight.device.type != "meta":
                noise = torch.randn(self.weight.shape, generator=generator, dtype=self.weight.dtype)
                noise = noise.to(self.weight.device)
                spread = (noise - noise.mean(dim=0, keepdim=True)) * kernel.pow(2).mean().sqrt() * KERNEL_SPREAD
            self.weight.copy_(kernel.unsqueeze(0) + spread)
            if self.bias is not None:
                self.bias.copy_(bias if bias is not None else torch.zeros_like(self.bias))

    @classmethod
    def from_conv(cls, conv: nn.Module, *, kernels: int = 1, hidden: int | None = None, name: str = "",
                  init: str = "preserve", generator: torch.Generator | None = None) -> "_ODConvNd":
        """An ODConv layer with ``conv``'s geometry, device and dtype; ``init="preserve"``
        starts it as ``conv`` (``"random"``: the authors' init; ``"none"``: for loading)."""
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, kernels=kernels,
                    hidden=hidden, name=name, device=conv.weight.device, dtype=conv.weight.dtype)
        if init == "preserve":
            layer.preserve(conv.weight, conv.bias, generator)
        return layer

    def kernels_per_sample(self, attentions: Attentions) -> Tensor:
        """``a_s ⊙ sum_i a_w,i W_i`` per sample: ``(B, C_out, C_in/g, *k)``."""
        if attentions.kernel is None:
            mixed = self.weight[0].unsqueeze(0)
        else:
            mixed = (attentions.kernel @ self.weight.flatten(1)).view(-1, *self.per_sample_shape)
        if attentions.spatial is not None:
            spatial = attentions.spatial.view(-1, 1, 1, *self.kernel_size)
            mixed = mixed * spatial
        return mixed

    def forward(self, x: Tensor) -> Tensor:
        x, unbatched = self._check_input(x)
        if x.shape[0] == 0:
            return self._empty_batch(x)
        attentions = self.attention(x)
        ones = (1,) * self._spatial_dims
        x = x * attentions.channel.view(*attentions.channel.shape, *ones)
        if attentions.kernel is None and attentions.spatial is None:  # one kernel for the whole batch
            out = self._shared_conv(x, self.weight[0])
        else:
            out = self._per_sample_conv(x, self.kernels_per_sample(attentions))
        if attentions.filter is not None:
            out = out * attentions.filter.view(*attentions.filter.shape, *ones)
        if self.bias is not None:
            out = out + self.bias.view(-1, *ones)
        return out.squeeze(0) if unbatched else out

    def extra_repr(self) -> str:
        return f"{self._geometry_repr()}, kernels={self.kernels}, hidden={self.hidden}, heads={'+'.join(self.heads.names)}"


class ODConv1d(Rank1, _ODConvNd):
    """ODConv drop-in for ``nn.Conv1d``."""


class ODConv2d(Rank2, _ODConvNd):
    """ODConv drop-in for ``nn.Conv2d``."""


class ODConv3d(Rank3, _ODConvNd):
    """ODConv drop-in for ``nn.Conv3d``."""


OD_LAYER_TYPES = (ODConv1d, ODConv2d, ODConv3d)
OD_CLASS = {"conv1d": ODConv1d, "conv2d": ODConv2d, "conv3d": ODConv3d}


def set_temperature(model: nn.Module, temperature: float) -> int:
    """Set T of every ODConv layer of ``model``; return how many there are."""
    layers = [module for module in model.modules() if isinstance(module, OD_LAYER_TYPES)]
    for layer in layers:
        layer.temperature = temperature
    return len(layers)


def temperature_at(epoch: float, warmup_epochs: float = WARMUP_EPOCHS, start: float = START_TEMPERATURE) -> float:
    """The authors' schedule for training from scratch: T falls linearly from ``start`` to 1
    over ``warmup_epochs`` (fractional epochs: per-iteration updates), then stays 1.

    A model converted from a trained one starts at T = 1 and needs no warm-up: its heads
    start at zero, where the temperature changes nothing.
    """
    if not epoch >= 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if warmup_epochs <= 0:
        return 1.0
    return 1.0 + max(0.0, (start - 1.0) * (1.0 - epoch / warmup_epochs))
