"""kwconvert/per_sample.py: gradients that come back in the memory format of the input a dynamic
layer read (a mismatch sent mobilenet_v2's BatchNorm and ReLU6 backward down torch's strided
path: its KW training step took 2.5x the plain one's time, 1.24-1.56x with matched formats)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import kwconvert
from kwconvert import use_path
from kwconvert.per_sample import grad_in_input_format, spatial_mean

from .helpers import FLOAT32

CHANNELS_LAST = torch.channels_last


def in_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=CHANNELS_LAST if channels_last else torch.contiguous_format)


def is_channels_last(x: torch.Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=CHANNELS_LAST)


@pytest.mark.parametrize("shape, channels_last", [((3, 5, 4, 6), False), ((3, 5, 4, 6), True), ((2, 7, 9), False),
                                                  ((2, 3, 2, 4, 5), False)])
def test_spatial_mean_is_the_mean_and_its_gradient_keeps_the_inputs_format(shape, channels_last):
    torch.manual_seed(0)
    x = in_format(torch.randn(shape, dtype=torch.float64), channels_last).requires_grad_()
    grad = torch.randn(shape[:2], dtype=torch.float64)
    dims = tuple(range(2, len(shape)))
    got, = torch.autograd.grad(spatial_mean(x), x, grad)
    expected, = torch.autograd.grad(x.mean(dim=dims), x, grad)
    assert torch.equal(spatial_mean(x), x.mean(dim=dims))
    assert torch.allclose(got, expected, rtol=0, atol=1e-15)
    assert is_channels_last(got) == channels_last and (channels_last or got.is_contiguous())
    with torch.no_grad():  # no autograd node where none is needed
        assert spatial_mean(x).grad_fn is None


def test_spatial_mean_can_leave_its_gradient_a_broadcast_view_that_is_never_written_out():
    """For a KW layer, whose convolution branch hands back the input's format: the pooled branch's
    gradient is a view with zero strides over the spatial dims, the mean's gradient all the same."""
    x = in_format(torch.randn(3, 5, 4, 6, dtype=torch.float64), True).requires_grad_()
    grad = torch.randn(3, 5, dtype=torch.float64)
    got, = torch.autograd.grad(spatial_mean(x, gradient_in_format=False), x, grad)
    expected, = torch.autograd.grad(x.mean(dim=(2, 3)), x, grad)
    assert got.stride()[2:] == (0, 0)
    assert torch.allclose(got, expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("channels_last", [False, True])
def test_grad_in_input_format_is_the_identity_with_the_gradient_in_the_inputs_format(channels_last):
    x = in_format(torch.randn(2, 3, 4, 5), channels_last).requires_grad_()
    through = grad_in_input_format(x)
    assert torch.equal(through, x)
    other = in_format(torch.randn(2, 3, 4, 5), not channels_last)
    got, = torch.autograd.grad(through, x, other)  # the gradient arrives in the other format
    assert torch.equal(got, other) and is_channels_last(got) == channels_last
    assert grad_in_input_format(x.detach()) is not None and grad_in_input_format(x.detach()).grad_fn is None


def converted_block() -> nn.Module:
    """A dense and a depthwise convolution, converted at b = 1 (float64: gradients compared exactly)."""
    torch.manual_seed(1)
    block = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU6(),
                          nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=32))
    return kwconvert.convert(block, 1.0, example_inputs=(torch.randn(2, 16, 8, 8),)).train()


PATHS = ("grouped", "folded", "conv", "matmul", "bmm", "premix", "inline")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_a_kw_layers_input_gradient_comes_back_in_the_inputs_format_on_every_path(path, channels_last):
    """Whatever path a layer trains on, the gradient of its input has the input's memory format,
    so the BatchNorm and activation before it run their matched-format backward; and it is the
    reference path's gradient."""
    block = converted_block()
    x = in_format(torch.randn(3, 16, 8, 8), channels_last).requires_grad_()
    grad = torch.randn(3, 32, 4, 4)
    with use_path(path):
        got, = torch.autograd.grad(block(x), x, grad)
    with kwconvert.reference_path():
        expected, = torch.autograd.grad(block(x), x, grad)
    assert is_channels_last(got) == channels_last and (channels_last or got.is_contiguous())
    assert (got - expected).abs().max() <= FLOAT32 * expected.abs().max()


@pytest.mark.parametrize("path", PATHS + ("reference",))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_a_channels_last_input_gives_a_channels_last_output_on_every_path(path, training):
    """As torch's convolution does, so the norm, activation and residual sum after a layer run
    in one format; the folded batch of the grouped and reference paths came out NCHW."""
    block = converted_block().train(training)
    x = in_format(torch.randn(3, 16, 8, 8), True)
    with kwconvert.reference_path() if path == "reference" else use_path(path), torch.set_grad_enabled(training):
        dense = block[0](x)
        assert is_channels_last(dense) and is_channels_last(block[3](in_format(dense, True)))
        same_in_nchw = block[0](in_format(x, False))
    assert (dense - same_in_nchw).abs().max() <= FLOAT32 * same_in_nchw.abs().max()  # the format alone


def small_classifier() -> nn.Module:
    """Three 3x3 convolutions (two of one shape, for KernelDNA to derive one from the other) and
    two linear layers, for 8 input channels."""
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(8, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 10))


@pytest.mark.parametrize("method, budget, options", [("kernelwarehouse", 1.0, {"stem": "warehouse"}),
                                                     ("odconv", 4, {"stem": "convert"}), ("kerneldna", None, {})],
                         ids=["kernelwarehouse", "odconv", "kerneldna"])
def test_an_empty_batch_gives_an_empty_output_as_the_original_does(method, budget, options):
    """A batch of no sample (a detection head given no proposals) runs through every converted layer
    and comes out empty, of the original's output shape, where the per-sample paths cannot split it."""
    model = small_classifier().eval()
    x = torch.randn(0, 8, 6, 6)
    with torch.no_grad():
        expected = model(x)
        converted = kwconvert.convert(model, budget, method=method, example_inputs=(torch.randn(2, 8, 6, 6),),
                                      inplace=False, **options).eval()
        dynamic = [m for m in converted.modules() if hasattr(m, "_empty_batch")]
        assert dynamic
        for path in (None, "grouped", "inline") if method == "kernelwarehouse" else (None,):
            with use_path(path) if path else torch.no_grad():
                out = converted(x)
            assert out.shape == expected.shape == (0, 10) and out.dtype == expected.dtype


@pytest.mark.parametrize("shape", [(0, 8), (0, 5, 8), (3, 0, 8)])
def test_an_empty_batch_or_sequence_through_a_kw_linear_layer_comes_out_empty(shape):
    """As nn.Linear's: no sample, or samples of no row, give an empty output of out_features columns."""
    warehouse = kwconvert.Warehouse(4, (6, 8))
    layer = kwconvert.KWLinear(8, 6, warehouse=warehouse, offset=0, budget=1, hidden=16).eval()
    with torch.no_grad():
        out = layer(torch.randn(shape))
    assert out.shape == (*shape[:-1], 6)
