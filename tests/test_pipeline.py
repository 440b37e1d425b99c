"""One conversion job (kwconvert.pipeline): comparing outputs that are not one tensor."""
import math

import pytest
import torch
from torch import nn

from kwconvert.pipeline import Conversion, compare_outputs


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
