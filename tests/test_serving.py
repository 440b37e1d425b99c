"""Serving from float16 warehouse copies (kwconvert/methods/kernelwarehouse/serving.py): the
error is measured on the user's inputs, the copy is what inference reads, training never is,
and a save carries the choice."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from typer.testing import CliRunner

import kwconvert
from kwconvert_cli.main import app
from kwconvert.io import read_metadata
from kwconvert.methods.kernelwarehouse import native, serving
from kwconvert.methods.kernelwarehouse.layers import Warehouse

from .helpers import FLOAT32, input_dependent

needs_half = pytest.mark.skipif(not native.mixes_half(),
                                reason="needs the compiled AVX2 / AVX-512 kernel (float16 conversion)")


def converted_resnet18() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    return input_dependent(kwconvert.convert(model, 1.0, model_name="torchvision:resnet18")).eval()


def with_cells_rounded_to_float16(model: torch.nn.Module) -> torch.nn.Module:
    """What float16 serving should compute: the same model with its cells rounded to float16."""
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for warehouse in serving.warehouses(rounded).values():
            warehouse.cells.copy_(warehouse.cells.half().float())
    return rounded


@pytest.fixture(scope="module")
def converted():
    return converted_resnet18(), torch.randn(2, 3, 64, 64)


@pytest.fixture
def model_and_inputs(converted):
    """A copy of the converted model for each test (they switch its warehouses), and inputs."""
    model, x = converted
    return copy.deepcopy(model), x


@needs_half
def test_half_serving_computes_the_model_with_float16_cells(model_and_inputs):
    model, x = model_and_inputs
    with torch.no_grad():
        before = model(x)
        error = kwconvert.half_warehouses(model, x)
        after = model(x)
        with kwconvert.use_path("native"):  # every layer's assembly from the copy ("inline" reads float32)
            served, rounded = model(x), with_cells_rounded_to_float16(model)(x)
    found = serving.warehouses(model)
    assert len(found) == 4 and all(warehouse.serves_half for warehouse in found.values())
    assert error == pytest.approx(serving.output_error(before, after))
    assert 1e-6 < error <= serving.HALF_TOLERANCE  # float16's rounding shows, within the tolerance
    assert 1e-6 < serving.output_error(before, served) <= serving.HALF_TOLERANCE
    assert serving.output_error(rounded, served) <= FLOAT32  # ... and nothing else differs
    assert "serves float16" in repr(next(iter(found.values())))


@needs_half
def test_training_reads_the_float32_cells(model_and_inputs):
    model, x = model_and_inputs
    half = copy.deepcopy(model)
    kwconvert.half_warehouses(half, x)
    model, half = model.train(), half.train()
    for module in (model, half):  # batch statistics: both train-mode forwards see the same numbers
        for norm in module.modules():
            if isinstance(norm, torch.nn.BatchNorm2d):
                norm.momentum = 0.0
    out, out_half = model(x), half(x)
    assert serving.output_error(out, out_half) <= FLOAT32
    out_half.sum().backward()
    assert all(warehouse.cells.grad is not None for warehouse in serving.warehouses(half).values())


@needs_half
def test_a_missed_tolerance_keeps_float32_and_says_by_how_much(model_and_inputs):
    model, x = model_and_inputs
    with torch.no_grad():
        before = model(x)
        with pytest.raises(ValueError, match=r"move the outputs by \d\.\d\de-\d\d of their scale, more than the "
                                             r"tolerance 1e-09: the warehouses stay float32"):
            kwconvert.half_warehouses(model, x, tolerance=1e-9)
        assert not any(warehouse.serves_half for warehouse in serving.warehouses(model).values())
        assert torch.equal(model(x), before)


def test_a_model_without_warehouses_or_a_kernel_that_cannot_convert_is_refused(model_and_inputs, monkeypatch):
    model, x = model_and_inputs
    with pytest.raises(ValueError, match="no KernelWarehouse warehouses: convert it first"):
        kwconvert.half_warehouses(torchvision.models.resnet18(weights=None, num_classes=10), x)
    with pytest.raises(ValueError, match=r"serve float32 models on the CPU .*; this model's warehouses are "
                                         r"torch.float64 on cpu"):
        kwconvert.half_warehouses(copy.deepcopy(model).double(), x.double())
    with pytest.raises(ValueError, match="this model's warehouses are torch.float32 on meta"):
        kwconvert.half_warehouses(copy.deepcopy(model).to("meta"), x.to("meta"))
    monkeypatch.setattr(native, "mixes_half", lambda: False)
    with pytest.raises(RuntimeError, match="need kwconvert's compiled AVX2 or AVX-512 kernel.*stay float32"):
        kwconvert.half_warehouses(model, x)
    assert not any(warehouse.serves_half for warehouse in serving.warehouses(model).values())


@needs_half
def test_a_saved_model_serves_half_again_after_load(model_and_inputs, tmp_path):
    model, x = model_and_inputs
    kwconvert.half_warehouses(model, x)
    kwconvert.save(model, tmp_path / "m")
    assert sorted(read_metadata(tmp_path / "m")["half_warehouses"]) == sorted(serving.warehouses(model))
    loaded = kwconvert.load(tmp_path / "m", model=torchvision.models.resnet18(weights=None, num_classes=10)).eval()
    assert all(warehouse.serves_half for warehouse in serving.warehouses(loaded).values())
    with torch.no_grad():
        assert serving.output_error(model(x), loaded(x)) <= FLOAT32
    shown = CliRunner().invoke(app, ["show", str(tmp_path / "m")])
    assert "4 warehouses served from float16 copies in inference" in " ".join(shown.stdout.split())


def test_a_warehouse_shared_by_many_layers_is_listed_once():
    shared = Warehouse(4, (8, 8, 1, 1))
    model = torch.nn.Sequential(torch.nn.Module(), torch.nn.Module())
    model[0].warehouse = model[1].warehouse = shared
    assert serving.warehouses(model) == {"0.warehouse": shared}
