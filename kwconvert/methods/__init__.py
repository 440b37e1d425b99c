"""The conversion methods kwconvert plans and builds, one folder per method that has its own.

* ``kernelwarehouse`` (default): warehouses shared by the layers of a stage (Li & Yao,
  ICML 2024); :mod:`kwconvert.methods.kernelwarehouse`.
* ``dynamic_conv``: DY-Conv / CondConv, n whole kernels per layer, as KernelWarehouse's
  degenerate case (the plan option ``mode="dynamic_conv"``).
* ``odconv``: ODConv (Li, Zhou & Yao, ICLR 2022), attention over the four dimensions of
  each layer's kernels; :mod:`kwconvert.methods.odconv`.
* ``kerneldna``: KernelDNA (Huang et al., 2025), convolutions of a stage with one kernel
  shape derived from one of them (the parent) with cheap scalings and an input gate;
  :mod:`kwconvert.methods.kerneldna`.

The tracer, the ``Plan`` hand-off, the rewriter's module swap, save / load and export are
shared.  A per-layer method (ODConv) lists its layers in ``Plan.layers`` rather than in
warehouses.
"""
from __future__ import annotations

from torch import nn

from .kerneldna import layers as kerneldna_layers
from .odconv import layers as odconv_layers

#: Method name -> one line for help texts.
METHODS = {
    "kernelwarehouse": "KernelWarehouse: warehouses of kernel cells shared within a stage (--budget b)",
    "dynamic_conv": "DY-Conv / CondConv: n whole kernels per layer (--budget n)",
    "odconv": "ODConv: n kernels per layer, attention over channels, filters, kernel positions and kernels (--kernels n)",
    "kerneldna": "KernelDNA: convolutions of one shape in a stage derived from one parent kernel, with an input gate",
}
#: Methods whose plans hold warehouses (DY-Conv is KernelWarehouse with whole kernels as cells).
WAREHOUSE_METHODS = ("kernelwarehouse", "dynamic_conv")
#: Methods whose plans list layers, each converted on its own, rather than warehouses.
PER_LAYER_METHODS = ("odconv", "kerneldna")
#: Per-layer methods whose layers derive from a parent kernel (fitted, not exact, at conversion).
DERIVED_METHODS = ("kerneldna",)


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    return method


def layer_params(method: str, layer) -> int:
    """Parameters of one per-layer method's layer (a ``DynamicLayerPlan``), bias excluded."""
    if method == "odconv":
        return odconv_layers.layer_params(layer.in_channels, layer.weight_shape[0], layer.groups,
                                          tuple(layer.weight_shape[2:]), layer.kernels, layer.hidden)
    if method == "kerneldna":
        return kerneldna_layers.layer_params(layer.in_channels, layer.weight_shape[0], tuple(layer.weight_shape[2:]),
                                             layer.hidden)
    raise ValueError(f"method {method!r} plans warehouses, not layers")


def temperature_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every layer of ``model`` with a temperature that a save must keep, by qualified name:
    KernelWarehouse layers (``tau``, 1 -> 0) and ODConv layers (``temperature``, 30 -> 1)."""
    from .kernelwarehouse.layers import is_kw_layer
    return {name: module for name, module in model.named_modules()
            if is_kw_layer(module) or isinstance(module, odconv_layers.OD_LAYER_TYPES)}


def temperature_of(layer: nn.Module) -> float:
    return float(layer.temperature if isinstance(layer, odconv_layers.OD_LAYER_TYPES) else layer.tau)


def set_temperature_of(layer: nn.Module, value: float) -> None:
    if isinstance(layer, odconv_layers.OD_LAYER_TYPES):
        layer.temperature = value
    else:
        layer.tau = value
