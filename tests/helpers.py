"""Helpers shared by the tests (command line: test_cli.py, test_bad_input.py, test_models.py;
per-sample kernels: test_export.py, test_fast.py, test_native.py; planning torchvision
models: test_plan.py, test_plan_allocator.py)."""
from __future__ import annotations

import functools
import shutil
import sys
from pathlib import Path

import torch
import torchvision
from torch import nn

from kwconvert.plan import Plan, plan
from kwconvert.trace import LayerGraph, trace

#: Tolerance of float32 results, relative to the largest value compared: 2**7 float32 epsilons
#: (1.5e-5), room for the accumulation orders of different CPUs' kernels (AVX2, AVX-512, AMX).
FLOAT32 = 2**7 * torch.finfo(torch.float32).eps


def one_line(text: str) -> str:
    """The only non-blank line of ``text`` (a command's stderr), which holds no traceback."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


def installed_script() -> str:
    """The ``kwconvert`` console script of this environment."""
    script = Path(sys.executable).parent / "kwconvert"
    return str(script) if script.exists() else shutil.which("kwconvert")


class CodePayload:
    """Unpickling this creates ``marker``: a loader that runs it has executed the file's code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def input_dependent(model: nn.Module) -> nn.Module:
    """Re-draw every KW layer's attention (the paper's init) so each sample gets its own kernel.

    A weight-preserving conversion starts every attention on beta for all inputs; tests of
    the per-sample paths need kernels that differ between samples to prove anything.
    """
    from kwconvert.methods.kernelwarehouse.layers import is_kw_layer
    for module in model.modules():
        if is_kw_layer(module):
            module.attention.reset_parameters()
    return model


@functools.lru_cache(maxsize=None)
def trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorms the non-trivial statistics and affine parameters a trained model has."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
    return model


def graph_of(name: str, **kwargs) -> LayerGraph:
    """The traced graph of a torchvision model (random weights), once per test process."""
    return trace(torchvision.models.get_model(name, weights=None, **kwargs))


def plan_of(name: str, budget: float, **options) -> Plan:
    return plan(None, budget, graph=graph_of(name), model_name=name, **options)
