"""KernelDNA layers: a child convolution derived from a parent kernel it shares.

KernelDNA (Huang et al., 2025, arXiv 2503.23379) lets the convolutions of a stage that
have the same kernel shape share one parent kernel P; each other one becomes a child whose
kernel is P scaled along its kernel positions and its filters, with an input-dependent
gate on its input channels:

    W_j  = P * (1 + S_j) * (1 + F_j)              S_j: 1 x 1 x k (positions), F_j: C_out x 1 x 1
    g(x) = sigmoid(W2 ReLU(BN(W1 GAP(x))) + b2)   C_in values, width C_in / 4
    y_j  = conv(x * g(x), W_j) + bias

The dynamic part acts on the input channels, so a child is one ordinary convolution per
batch (its kernel is built once per forward, not per sample): hence KernelDNA's claim of
nearly the plain model's speed.  The child keeps the model's own BatchNorm after it.

Converting a trained model: the parent is one of the trained kernels; ``S_j`` and ``F_j``
are fitted by alternating least squares so that ``W_j`` is as close as the scalings allow
to the trained kernel it replaces, times 2: a fresh gate (``W2`` and ``b2`` at zero) gives
1/2 on every channel, which the factor 2 compensates.  The parent either stays exactly
its trained kernel or is fitted with its children first (:mod:`.fitting`, plan option
``fit_parent``): a kernel between the trained ones lowers the family's summed error.  The
fits' relative errors are what each layer loses until fine-tuning; the plan reports them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..common import batch_norm_any_batch
from .fitting import fit_scalings, relative_error
from ...per_sample import PerSampleConv, Rank1, Rank2, Rank3, spatial_mean

#: The gate's width: ``max(C_in // REDUCTION, 1)`` (the authors' reduction 4).
REDUCTION = 4
#: What a fresh gate (sigmoid(0)) multiplies the input by; the fitted kernel undoes it.
FRESH_GATE = 0.5


def gate_width(in_channels: int, reduction: int = REDUCTION) -> int:
    return max(in_channels // reduction, 1)


def layer_params(in_channels: int, out_channels: int, kernel_size: tuple[int, ...], hidden: int) -> int:
    """A child's own parameters besides its bias: S_j, F_j and its gate (the kernel is the parent's)."""
    return math.prod(kernel_size) + out_channels + in_channels * hidden + 2 * hidden + hidden * in_channels + in_channels


class ChannelGate(nn.Module):
    """g(x) = sigmoid(W2 ReLU(BN(W1 GAP(x))) + b2): one value per input channel and sample."""

    def __init__(self, in_channels: int, hidden: int, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.squeeze = nn.Linear(in_channels, hidden, bias=False, **factory)
        self.norm = nn.BatchNorm1d(hidden, **factory)
        self.excite = nn.Linear(hidden, in_channels, **factory)

    def forward(self, x: Tensor) -> Tensor:
        pooled = spatial_mean(x)
        return torch.sigmoid(self.excite(F.relu(batch_norm_any_batch(self.norm, self.squeeze(pooled)))))


class _KDNAConvNd(PerSampleConv, nn.Module):
    """A KernelDNA child convolution (any rank); see the module docstring for the equation.

    ``parent`` is the convolution whose kernel it derives from: registered as a submodule,
    so the kernel is one shared tensor (moved, trained and saved once).
    """

    def __init__(self, parent: nn.Module, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *,
                 hidden: int | None = None, name: str = "", device=None, dtype=None) -> None:
        super().__init__()
        self.name = name
        self._set_geometry(self._label, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                           padding_mode)
        if tuple(parent.weight.shape) != self.per_sample_shape:
            raise ValueError(f"{self._label}: the parent's kernel {tuple(parent.weight.shape)} is not the child's "
                             f"{self.per_sample_shape}")
        factory = {"device": device, "dtype": dtype}
        self.parent = parent
        self.hidden = gate_width(in_channels) if hidden is None else hidden
        self.position_scale = nn.Parameter(torch.zeros(self.kernel_size, **factory))    # S_j
        self.filter_scale = nn.Parameter(torch.zeros(out_channels, **factory))     # F_j
        self.gate = ChannelGate(in_channels, self.hidden, **factory)
        self.bias = nn.Parameter(torch.zeros(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """From scratch: scalings at zero (the child starts as its parent), the gate's
        squeeze Kaiming-initialised, its excitation at torch's default."""
        with torch.no_grad():
            self.position_scale.zero_()
            self.filter_scale.zero_()
            nn.init.kaiming_normal_(self.gate.squeeze.weight, mode="fan_out", nonlinearity="relu")
            self.gate.norm.reset_parameters()
            self.gate.excite.reset_parameters()

    def preserve(self, weight: Tensor, bias: Tensor | None,
                 scalings: tuple[Tensor, Tensor] | None = None) -> float | None:
        """Start as close to the trained convolution ``(weight, bias)`` as the parent allows:
        the gate at 1/2 everywhere, S_j and F_j fitted to ``weight / FRESH_GATE`` (or set from
        ``scalings`` = ``(1 + S_j, 1 + F_j)``, fitted with the parent: :func:`.fitting.fit_family`).
        Returns the relative error of the kernel the child holds (0 when it is the parent's,
        rescaled; None on the meta device, where there are no values to fit)."""
        with torch.no_grad():
            self.gate.excite.weight.zero_()
            self.gate.excite.bias.zero_()
            if self.bias is not None:
                self.bias.copy_(bias if bias is not None else torch.zeros_like(self.bias))
            if self.parent.weight.is_meta:
                return None
            target = weight / FRESH_GATE
            s, f = fit_scalings(self.parent.weight, target)[:2] if scalings is None else scalings
            self.position_scale.copy_((s - 1).view(self.kernel_size))
            self.filter_scale.copy_(f - 1)
            return relative_error(self.kernel(), target)

    @classmethod
    def from_conv(cls, conv: nn.Module, parent: nn.Module, *, hidden: int | None = None, name: str = "",
                  init: str = "preserve", scalings: tuple[Tensor, Tensor] | None = None
                  ) -> tuple["_KDNAConvNd", float | None]:
        """A child with ``conv``'s geometry deriving from ``parent``, and its fit error
        (``init="preserve"``, with ``scalings`` when given; None otherwise)."""
        layer = cls(parent, conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, hidden=hidden, name=name,
                    device=conv.weight.device, dtype=conv.weight.dtype)
        error = layer.preserve(conv.weight, conv.bias, scalings) if init == "preserve" else None
        return layer, error

    def kernel(self) -> Tensor:
        """W_j = P * (1 + S_j) * (1 + F_j)."""
        ones = (1,) * self._spatial_dims
        return (self.parent.weight * (1 + self.position_scale)
                * (1 + self.filter_scale).view(-1, 1, *ones))

    def forward(self, x: Tensor) -> Tensor:
        x, unbatched = self._check_input(x)
        if x.shape[0] == 0:
            return self._empty_batch(x)
        gate = self.gate(x)
        out = self._shared_conv(x * gate.view(*gate.shape, *(1,) * self._spatial_dims), self.kernel())
        if self.bias is not None:
            out = out + self.bias.view(-1, *(1,) * self._spatial_dims)
        return out.squeeze(0) if unbatched else out

    def extra_repr(self) -> str:
        return f"{self._geometry_repr()}, gate width={self.hidden}"


class KDNAConv1d(Rank1, _KDNAConvNd):
    """KernelDNA child drop-in for ``nn.Conv1d``."""


class KDNAConv2d(Rank2, _KDNAConvNd):
    """KernelDNA child drop-in for ``nn.Conv2d``."""


class KDNAConv3d(Rank3, _KDNAConvNd):
    """KernelDNA child drop-in for ``nn.Conv3d``."""


KDNA_LAYER_TYPES = (KDNAConv1d, KDNAConv2d, KDNAConv3d)
KDNA_CLASS = {"conv1d": KDNAConv1d, "conv2d": KDNAConv2d, "conv3d": KDNAConv3d}
