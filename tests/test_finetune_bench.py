"""The fine-tuning benchmark's pieces (``benchmarks/finetune.py``) in miniature, in seconds.

Pruning needs ``torch-pruning`` (the ``bench`` extra) and the end-to-end run needs Fashion-MNIST
(``make data``); without them those tests are skipped.  The full benchmark is
``make bench-finetune``.
"""
import dataclasses
import importlib.util
import json

import pytest
import torch
from rich.console import Console

from benchmarks import fashion_mnist as fm
from benchmarks import finetune

MISSING = fm.missing_files()
needs_data = pytest.mark.skipif(bool(MISSING), reason=(
    f"Fashion-MNIST is not installed ({MISSING[0] if MISSING else ''} is missing): run `make data`"))
needs_pruning = pytest.mark.skipif(importlib.util.find_spec("torch_pruning") is None,
                                   reason="torch-pruning is not installed: pip install -e '.[bench]'")


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return fm.ResidualCNN().eval()


def test_optimizer_groups_take_the_multipliers(net):
    kw = finetune.convert(net, 1.0, finetune.RECIPE)
    optimizer = finetune.make_optimizer(kw, finetune.RECIPE.stage("finetune"), {"cells": 2.0, "attention": 10.0})
    lrs = {group["kind"]: group["lr"] for group in optimizer.param_groups}
    assert lrs["other"] == pytest.approx(finetune.RECIPE.finetune_lr)
    assert lrs["cells"] == pytest.approx(2 * lrs["other"]) and lrs["attention"] == pytest.approx(10 * lrs["other"])
    assert sum(p.numel() for group in optimizer.param_groups for p in group["params"]) == fm.parameter_count(kw)
    below = finetune.convert(net, 0.5, finetune.RECIPE)  # every warehouse below b = 1: the fitted cells' rate
    optimizer = finetune.make_optimizer(below, finetune.RECIPE.stage("finetune"), {"cells": 2.0, "fitted cells": 5.0})
    cell_lrs = [group["lr"] for group in optimizer.param_groups if group["kind"] == "cells"]
    assert cell_lrs and cell_lrs == pytest.approx([5 * finetune.RECIPE.finetune_lr] * len(cell_lrs))
    assert finetune.RECIPE.multipliers()["fitted cells"] == finetune.FINE_TUNE.fitted_cell_lr_scale


def test_macs_count_the_kernel_assembly_and_latency_times_every_model(net):
    plain = finetune.macs(net)
    # Convolutions and the classifier of the 28x28 net: about 10.15 M multiply-accumulates.
    assert 10.0e6 < plain["total"] < 10.3e6 and set(plain["by_op"]) == {"convolution", "addmm"}
    kw = finetune.convert(net, 1.0, finetune.RECIPE)
    counted = finetune.macs(kw)
    assert counted["total"] > plain["total"] and counted["by_op"]["mm"] > 0  # the assembly
    assert counted["by_op"]["convolution"] == plain["by_op"]["convolution"]
    timed = finetune.latency({"a": net, "b": kw}, batch=4, reps=2, warmup=1)
    assert set(timed) == {"a", "b"} and all(t["median_s"] > 0 for t in timed.values())


@needs_pruning
def test_pruning_reaches_the_half_budget_parameter_count(net):
    target = fm.parameter_count(finetune.convert(net, 0.5, finetune.RECIPE))
    pruned, info = finetune.prune_to(net, target, tolerance=0.01)
    assert info["within_tolerance"] and fm.parameter_count(pruned) == info["params"]
    assert abs(info["params"] - target) <= 0.01 * target
    assert pruned.fc.out_features == 10 and pruned(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert fm.parameter_count(net) == 308_074  # the original is untouched


@pytest.mark.slow  # about 20 s on 2 quiet cores (data loading, path timing of the KW layers), a minute under load
@needs_data
@needs_pruning
def test_a_tiny_run_writes_the_table_and_the_targets(tmp_path, capsys):
    out = tmp_path / "finetune.json"
    code = finetune.main(["--quick", "--train-images", "64", "--test-images", "50", "--pretrain-epochs", "1",
                          "--finetune-epochs", "1", "--latency-reps", "1", "--latency-batch", "2",
                          "--threads", "1", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert set(result["summary"]) == {"a", "b", "c", "d"}
    assert result["summary"]["b"]["finetune_steps"] == result["summary"]["a"]["finetune_steps"] == 2
    assert result["preserved_at_tau0_max_abs_logit_diff"] >= 0
    assert len(result["targets"]) == 3 and all("met" in goal for goal in result["targets"].values())
    assert "latency_ratio" in result["summary"]["c"]
    assert "target (c) >= (d) + 0.5" in capsys.readouterr().out


# =======================================================================================
# The MobileNetV2-like net (``--net mobile``)
# =======================================================================================
def test_the_net_flag_selects_the_mobile_net_and_its_results_files():
    assert finetune.parse_args([]).net == "residual" and finetune.parse_args([]).out.name == "finetune.json"
    assert finetune.parse_args(["--net", "mobile"]).out.name == "finetune_mobile.json"
    assert finetune.parse_args(["--net", "mobile", "--quick"]).out.name == "finetune_mobile_quick.json"
    assert finetune.preservation_landed("mobile") < 1e-4


@needs_pruning
def test_every_arm_of_the_mobile_net_on_synthetic_data():
    """One pre-training step, one fine-tuning step: (c) is the allocator's 1/2x plan, (d) pruned to it."""
    generator = torch.Generator().manual_seed(0)
    sets = {split: (torch.randn(count, *fm.INPUT_SIZE, generator=generator),
                    torch.randint(0, fm.CLASSES, (count,), generator=generator))
            for split, count in (("train", 32), ("test", 20))}
    recipe = dataclasses.replace(finetune.RECIPE, train_images=32, pretrain_epochs=1.0, finetune_epochs=1.0)
    row = finetune.run_seed(0, recipe, sets, ["a", "c", "d"], Console(quiet=True), latency_batch=2,
                            latency_reps=0, prune_tolerance=0.01, net="mobile")
    params = {arm: info["params"] for arm, info in row["arms"].items()}
    assert params["a"] == fm.parameter_count(fm.MobileCNN())
    assert params["c"] < 0.8 * params["a"] and abs(params["d"] / params["c"] - 1) <= 0.01
    assert all(info["finetune"]["steps"] == 1 for info in row["arms"].values())
