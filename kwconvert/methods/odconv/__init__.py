"""ODConv (Li, Zhou & Yao, ICLR 2022) as a kwconvert method: layers, planning rules, conversion."""
from .layers import (OD_LAYER_TYPES, ODAttention, ODConv1d, ODConv2d, ODConv3d, attention_width, layer_params,
                     set_temperature, temperature_at)

__all__ = ["OD_LAYER_TYPES", "ODAttention", "ODConv1d", "ODConv2d", "ODConv3d", "attention_width", "layer_params",
           "set_temperature", "temperature_at"]
