"""KernelWarehouse (Li & Yao, ICML 2024), and DY-Conv as its degenerate case (whole kernels as cells).

Planning (a traced model -> warehouses): :mod:`.planning` with :mod:`.options`,
:mod:`.grouping` (the reassigned stages), :mod:`.projections` (a ViT's q/k/v),
:mod:`.sizing` and :mod:`.cells` (the arithmetic of Sec. 3.2-3.4).
Layers (what a converted model is made of): :mod:`.layers`, running on CPU through
:mod:`.assembly`, :mod:`.paths` (chosen by :mod:`.path_choice`) and the compiled kernel of
:mod:`.native`; :mod:`.serving` serves inference from float16 warehouse copies.
"""
from .layers import (KW_LAYER_TYPES, KWAttention, KWConv1d, KWConv2d, KWConv3d, KWLinear, Warehouse, is_kw_layer,
                     set_temperature, temperature_at)

__all__ = ["KW_LAYER_TYPES", "KWAttention", "KWConv1d", "KWConv2d", "KWConv3d", "KWLinear", "Warehouse", "is_kw_layer",
           "set_temperature", "temperature_at"]
