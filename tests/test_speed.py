"""The speed benchmark's arithmetic and its fresh-process worker (benchmarks/speed.py).

The timings themselves are the benchmark's business (``make bench-speed``); here: ratios are
medians over processes of median over median, spreads pool the per-repetition ratios, and a
worker process returns timings for every variant it was asked for.
"""
import json
import os
import subprocess
import sys

import pytest

from benchmarks import speed


def test_ratio_is_the_median_over_processes_of_median_over_median():
    runs = [{"kw": [3.0, 2.0, 2.2], "plain": [1.0, 1.0, 1.1]},   # 2.2 / 1.0
            {"kw": [4.0, 4.4, 4.2], "plain": [2.0, 2.0, 2.0]},   # 4.2 / 2.0
            {"kw": [9.0, 9.0, 9.0], "plain": [3.0, 3.0, 3.0]}]   # 3.0
    result = speed.ratio(runs, "kw", "plain")
    assert result["per_process"] == pytest.approx([2.2, 2.1, 3.0])
    assert result["median"] == pytest.approx(2.2)
    # per-repetition ratios, sorted: 2.0 2.0 2.0 2.1 2.2 3.0 3.0 3.0 3.0; quartiles at positions 2 and 6
    assert result["p25"] == pytest.approx(2.0) and result["p75"] == pytest.approx(3.0)
    assert speed.ratio(runs, "kw", "plain_compiled") is None
    assert speed.median_ms(runs, "plain") == pytest.approx(2000.0)


@pytest.mark.slow
def test_timing_worker_times_every_variant_in_a_fresh_process():
    spec = {"model": "resnet18", "batch": 1, "modes": ["inference"], "budgets": [1.0], "compile": False,
            "reference": True, "reps": 1, "threads": 1, "allocator": "default"}
    done = subprocess.run([sys.executable, speed.__file__, "--timing-worker", json.dumps(spec)],
                          capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    times = result["times"]["inference"]
    assert set(times) == {"plain", "plain_cl", "kw_b1", "reference_b1"}
    assert all(len(values) == 1 and values[0] > 0 for values in times.values())
    assert sum(result["paths"].values()) > 0


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="reads Linux's /proc/cpuinfo")
def test_the_settings_name_the_cpu():
    with open("/proc/cpuinfo") as cpuinfo:
        name = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    assert speed.bench.cpu_description().startswith(f"{name} (family ")


def test_the_small_image_workload_trains_the_accuracy_benchmarks_net():
    """Issue 20's row: the Fashion-MNIST residual CNN, 1 x 28 x 28 inputs, 10 classes, a target of 2x."""
    images, labels = speed.inputs_for(speed.SMALL, 4)
    assert images.shape == (4, 1, 28, 28) and int(labels.max()) < 10
    assert speed.inputs_for("resnet18", 1)[0].shape == (1, 3, speed.IMAGE, speed.IMAGE)
    assert speed.TARGETS[(speed.SMALL, 64, "training")] == 2.0
    model = speed.build(speed.SMALL, 1.0)
    bmm = lambda: speed.execution.use_path("bmm")  # noqa: E731 (no path timing: a quick test)
    step = speed.make_step(speed.Variant("kw", model, context=bmm), "training", images, labels)
    step()
    assert all(p.grad is not None for name, p in model.named_parameters() if name.endswith("cells"))
