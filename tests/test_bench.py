"""Timing a converted model against its original (kwconvert.bench, ``kwconvert bench``)."""
import pytest
import torch
from torch import nn

import kwconvert
from kwconvert import bench

from .test_bad_input import small_cnn


class Clock:
    """A fake ``time.perf_counter`` that only the models move; copies of a model share it."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def __deepcopy__(self, memo):
        return self


class Takes(nn.Module):
    """A model whose call takes a known time on a fake clock, so that the ratio has a known
    answer whatever else the machine runs."""

    def __init__(self, seconds: float, clock: Clock):
        super().__init__()
        self.seconds, self.clock = seconds, clock
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        self.clock.now += self.seconds
        return {"out": x * self.scale, "count": torch.tensor(1)}  # a dict with a non-float leaf


def test_the_ratio_is_the_converted_time_over_the_original_s(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(bench.time, "perf_counter", clock)
    rows = bench.compare_speed(Takes(0.01, clock), Takes(0.03, clock), torch.ones(2, 3), repetitions=5)
    assert [row.mode for row in rows] == ["inference", "training"]
    for row in rows:
        assert row.ratio == pytest.approx(3.0) and row.ratio_p25 == pytest.approx(3.0) == row.ratio_p75
        assert row.original_ms == pytest.approx(10) and row.converted_ms == pytest.approx(30)
        assert row.batch == 2 and row.repetitions == 5


def test_the_callers_models_are_left_as_they_were():
    torch.manual_seed(0)
    original = small_cnn().train()
    converted = kwconvert.convert(small_cnn(), 0.5).eval()
    before = {k: v.clone() for k, v in converted.state_dict().items()}
    bench.compare_speed(original, converted, torch.randn(2, 3, 16, 16), modes=["training"], repetitions=1)
    assert original.training and not converted.training
    after = converted.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_training_step_reaches_every_parameter_through_any_output():
    model = Takes(0.0, Clock())
    step = bench.make_step(model, "training", torch.ones(2, 3))
    step()
    assert model.training and model.scale.grad is not None and model.scale.grad.abs().item() > 0


def test_repetitions_interleave_in_a_rotating_order():
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    times = bench.interleaved(steps, 3)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {name: len(values) for name, values in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_quartiles_interpolate_between_neighbours():
    assert bench.quartiles([4.0, 1.0, 3.0, 2.0]) == pytest.approx((1.75, 3.25))
    assert bench.quartiles([5.0]) == (5.0, 5.0)


@pytest.mark.parametrize("kwargs, pattern", [({"modes": ["serving"]}, "mode must be one of inference, training"),
                                             ({"repetitions": 0}, "repetitions must be at least 1")])
def test_bad_arguments_are_refused(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        bench.compare_speed(Takes(0.0, Clock()), Takes(0.0, Clock()), torch.ones(1, 3), **kwargs)
