"""One conversion job (kwconvert.pipeline): comparing outputs that are not one tensor, and
each converted layer with its original."""
import math

import pytest
import torch
from torch import nn

import kwconvert
from kwconvert.pipeline import LAYER_TOLERANCE, Conversion, ConversionMismatch, LayerCheck, compare_outputs


class TinyDetector(nn.Module):
    """A conv backbone, then per image a dict of ``detections[i]`` boxes, scores and labels,
    like torchvision's detectors, whose number of detections varies with the input."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1))
        self.detections = [3, 2]

    def forward(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        pooled = self.backbone(images).mean((2, 3))
        return [{"boxes": row[:4 * k].reshape(k, 4), "scores": row[:k].sigmoid(), "labels": torch.arange(k)}
                for row, k in zip(pooled, self.detections)]


def tiny_detector() -> nn.Module:
    return TinyDetector()


def test_compare_goes_leaf_by_leaf_and_reports_tensors_of_other_shapes():
    torch.manual_seed(0)
    job = Conversion("tests.test_pipeline:tiny_detector", 1.0, input_size=(3, 8, 8), module="backbone")
    job.build()
    job.make_plan()
    job.convert()
    job.converted.detections = [5, 2]  # the converted model finds two more boxes in image 0
    diff = job.compare()
    assert job.not_comparable == ("output[0]['boxes']: shape 3x4 vs 5x4", "output[0]['scores']: shape 3 vs 5",
                                  "output[0]['labels']: shape 3 vs 5")
    assert diff is not None and diff <= 1e-5  # image 1's tensors, and b = 1 at tau = 1 keeps the function
    assert set(job.diff_at_temperature) == {1.0, 0.0} and job.diff_at_temperature[0.0] <= 1e-5  # and as served
    assert {layer.tau for layer in job.converted.modules() if hasattr(layer, "attention")} == {1.0}
    assert job.output_scale > 0


def test_compare_outputs_of_other_structures():
    a, b = torch.ones(2, 3), torch.full((2, 3), 1.5)
    assert compare_outputs(a, b).max_abs_diff == 0.5 and compare_outputs(a, b).output_scale == 1.0
    diff = compare_outputs({"out": a, "aux": [a, a], "size": 3}, {"out": b, "aux": [a], "extra": a, "size": 4})
    assert diff.max_abs_diff == 0.5
    assert diff.not_comparable == ("output['aux']: length 2 vs 1", "output['extra']: only in the converted model's output")
    diff = compare_outputs((a, None), (a.flatten(), a))
    assert diff.max_abs_diff is None and diff.output_scale is None
    assert diff.not_comparable == ("output[0]: shape 2x3 vs 6", "output[1]: NoneType vs Tensor")
    empty = compare_outputs([torch.zeros(0, 4)], [torch.zeros(0, 4)])
    assert empty.max_abs_diff is None and empty.not_comparable == ()


@pytest.mark.parametrize("a, b", [(torch.ones(3, 4), torch.ones(5, 4)), ([torch.ones(1)], [torch.ones(1), torch.ones(1)])])
def test_max_abs_diff_is_nan_when_tensors_do_not_compare(a, b):
    from kwconvert.pipeline import _max_abs_diff  # benchmarks/zoo.py's check: NaN fails its bound
    assert math.isnan(_max_abs_diff(a, b))


def test_the_layer_check_finds_a_wrong_conversion():
    """Each converted layer is compared with its static original on the same input."""
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.Flatten(), nn.Linear(4096, 2))
    plan = kwconvert.plan(model, 1, torch.randn(1, 3, 12, 12))
    assert plan.converted_layers == ("0", "2")
    originals = {name: model.get_submodule(name) for name in plan.converted_layers}
    converted = kwconvert.convert(model, plan, inplace=False)
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        with LayerCheck(converted, originals) as check:
            converted(x)
        assert check.worst()[1] <= LAYER_TOLERANCE and not check.missing
        corrupt(converted)
        with LayerCheck(converted, originals) as check:
            converted(x)
    name, diff = check.worst()
    assert diff > LAYER_TOLERANCE and name in plan.converted_layers


def corrupt(model: nn.Module) -> None:
    with torch.no_grad():
        for name, cells in model.named_parameters():
            if name.endswith(".cells"):
                cells.mul_(1.01)


class ZeroHead(nn.Module):
    """torchvision's ViT in small: its head starts at zero, so every output is 0."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
        self.head = nn.Linear(32, 5)
        nn.init.zeros_(self.head.weight), nn.init.zeros_(self.head.bias)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def zero_head() -> nn.Module:
    return ZeroHead()


def test_a_zero_output_is_called_too_small_and_the_layers_are_compared_instead():
    job = Conversion("tests.test_pipeline:zero_head", 1.0, input_size=(3, 12, 12))
    job.build(), job.make_plan(), job.convert()
    assert job.compare() == 0.0 and job.output_scale == 0.0 and job.output_too_small
    for layer, relative in job.layer_diff_at_temperature.values():
        assert layer in job.plan.converted_layers and relative <= LAYER_TOLERANCE


def test_an_exact_conversion_that_is_not_exact_is_refused():
    job = Conversion("tests.test_pipeline:zero_head", 1.0, input_size=(3, 12, 12))
    job.build(), job.make_plan(), job.convert()
    corrupt(job.converted)
    with pytest.raises(ConversionMismatch, match=r"layer body\.\d differs from its original by .* at tau = 1, "
                                                 r"where the conversion should be exact .*nothing was saved"):
        job.compare()


def test_below_budget_1_the_fit_error_is_reported_not_refused():
    job = Conversion("tests.test_pipeline:zero_head", 0.5, input_size=(3, 12, 12))
    job.build(), job.make_plan(), job.convert()
    job.compare()
    assert all(w.budget < 1 for w in job.result_plan.warehouses)
    assert all(layer is None for layer, _ in job.layer_diff_at_temperature.values())  # no exact layer
