"""kwconvert: turn any PyTorch vision model into a KernelWarehouse (or ODConv, KernelDNA) model.

Pipeline, one module per stage, data flowing one way:
``trace`` (model -> LayerGraph) -> ``plan`` (LayerGraph + budget -> Plan) ->
``rewrite`` (model + Plan -> converted model) -> ``io`` (save / load) -> ``export``
(torch.export / ONNX).
"""
__version__ = "0.1.0"

from .methods.kernelwarehouse.layers import (KWConv1d, KWConv2d, KWConv3d, KWLinear, Warehouse, set_temperature,  # noqa: E402
                     temperature_at)
from .plan import Plan, parse_budget, plan  # noqa: E402
from .rewrite import convert, plan_of  # noqa: E402
from .io import load, save  # noqa: E402
from .export import export  # noqa: E402
from .trace import trace  # noqa: E402
from .methods.kernelwarehouse.path_choice import tune  # noqa: E402
from .methods.kernelwarehouse.serving import half_warehouses  # noqa: E402
from .execution import reference_path, use_path  # noqa: E402

__all__ = [
    "KWConv1d", "KWConv2d", "KWConv3d", "KWLinear", "Warehouse", "Plan", "convert", "export", "half_warehouses", "load",
    "parse_budget", "plan", "plan_of", "reference_path", "save", "set_temperature", "temperature_at", "trace", "tune",
    "use_path",
]
