"""KernelDNA (Huang et al., 2025) as a kwconvert method: child convolutions derived from
a parent kernel of the same stage, in place (the model keeps its depth and forward)."""
from .fitting import FamilyFit, fit_family, fit_scalings
from .layers import KDNA_LAYER_TYPES, ChannelGate, KDNAConv1d, KDNAConv2d, KDNAConv3d, layer_params

__all__ = ["KDNA_LAYER_TYPES", "ChannelGate", "FamilyFit", "KDNAConv1d", "KDNAConv2d", "KDNAConv3d", "fit_family",
           "fit_scalings", "layer_params"]
