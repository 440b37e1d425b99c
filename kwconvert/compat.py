"""Conv subclasses whose forward is a plain convolution plus a known extra.

A Conv2d subclass that overrides ``forward`` cannot simply be swapped for a
KernelWarehouse layer: the swap would drop whatever the forward adds.  timm's own
subclasses add one or both of two things, each of which kwconvert reproduces:

* TensorFlow "SAME" padding computed from the input size (``Conv2dSame``, and the
  ``*Same`` weight-standardised convolutions when their padding is dynamic): the KW layer
  is wrapped in :class:`SamePadded`, which pads its input the same way;
* weight standardisation (``StdConv2d``, BiT; ``ScaledStdConv2d``, NFNets): the kernel the
  layer convolves with is a function of its parameters only, so the cells are cut from
  that *effective* kernel (:func:`effective_weight`) and the layer's gain, which only
  shaped it, is dropped.  At tau = 1 the converted layer computes what the original did;
  the cells then train like any other (paper Sec. 3.3's warehouse initialisation).

Any other subclass with its own forward stays static, with that reason (methods/kernelwarehouse/grouping.py).  The
names are timm's class paths; timm itself is only imported by the models that use them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Extras", "EXTRAS", "extras_of", "effective_weight", "plain_equivalent", "SamePadded"]


@dataclass(frozen=True)
class Extras:
    """What a subclass's forward adds around ``F.conv2d``."""
    same_padding: bool      # pads like TF 'SAME' (when the module's own flag says so)
    standardised: bool      # convolves with a weight-standardised kernel
    scaled: bool = False    # ... scaled by ``gain * scale`` (NFNets)


EXTRAS = {
    "timm.layers.conv2d_same.Conv2dSame": Extras(same_padding=True, standardised=False),
    "timm.layers.conv2d_same.Conv2dSameExport": Extras(same_padding=True, standardised=False),
    "timm.layers.std_conv.StdConv2d": Extras(same_padding=False, standardised=True),
    "timm.layers.std_conv.StdConv2dSame": Extras(same_padding=True, standardised=True),
    "timm.layers.std_conv.ScaledStdConv2d": Extras(same_padding=False, standardised=True, scaled=True),
    "timm.layers.std_conv.ScaledStdConv2dSame": Extras(same_padding=True, standardised=True, scaled=True),
}


def class_path(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def extras_of(module: nn.Module) -> Extras | None:
    """The extras of a known subclass, None for any other module."""
    return EXTRAS.get(class_path(module))


def effective_weight(module: nn.Conv2d) -> Tensor:
    """The kernel ``module`` convolves with (its weight, standardised when it standardises)."""
    extras = extras_of(module)
    weight = module.weight
    if extras is None or not extras.standardised:
        return weight.detach()
    scale = (module.gain * module.scale).view(-1) if extras.scaled else None
    with torch.no_grad():
        flat = F.batch_norm(weight.reshape(1, module.out_channels, -1), None, None, weight=scale,
                            training=True, momentum=0.0, eps=module.eps)
    return flat.reshape_as(weight)


def pads_dynamically(module: nn.Module) -> bool:
    extras = extras_of(module)
    return extras is not None and extras.same_padding and getattr(module, "same_pad", True)


def plain_equivalent(module: nn.Conv2d) -> nn.Conv2d:
    """A plain ``nn.Conv2d`` with the module's hyper-parameters and effective kernel.

    Its padding is the module's static padding (0 for dynamic 'SAME' padding, which
    :class:`SamePadded` adds around the converted layer).
    """
    weight = module.weight
    plain = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                      module.padding, module.dilation, module.groups, bias=module.bias is not None,
                      padding_mode=module.padding_mode, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        plain.weight.copy_(effective_weight(module))
        if module.bias is not None:
            plain.bias.copy_(module.bias)
    return plain


class SamePadded(nn.Module):
    """Pad the input like TensorFlow's 'SAME' convolution, then run ``conv`` (padding 0).

    The padding depends on the input size: ``max((ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0)``
    per spatial dim, the odd pixel on the right and bottom (timm's ``pad_same``).
    """

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for size, kernel, stride, dilation in reversed(list(zip(x.shape[-2:], self.conv.kernel_size,
                                                                self.conv.stride, self.conv.dilation))):
            total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return self.conv(F.pad(x, pads))
