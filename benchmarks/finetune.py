"""Compress a trained model and fine-tune it: KernelWarehouse against channel pruning (issue 14).

Trains the Fashion-MNIST benchmark net (``benchmarks/fashion_mnist.py``'s residual CNN) once per
seed, then fine-tunes four arms from that one trained model, for the same number of steps over
the same images in the same order:

* (a) the original, fine-tuned;
* (b) KW 1x converted from it (``init="preserve"``);
* (c) KW 1/2x converted from it;
* (d) the original pruned with Torch-Pruning (channel groups by L2 magnitude, the classifier
  kept whole) to (c)'s parameter count, fine-tuned;
* on request (``--arms a e f g h``, issue 17): (e) ODConv 1x, (f) ODConv 4x and (g) KernelDNA
  converted from it (``kwconvert.methods``), fine-tuned with the same plain recipe as (a);
  (h) KernelDNA with its parents' kernels fitted with their children's (``fit_parent=True``;
  (g) keeps them exact, the default).

For each it reports the test accuracy right after conversion / pruning (KW at the serving
temperature, tau = 0), the final accuracy, parameters, MACs for one image
(``torch.utils.flop_counter.FlopCounterMode``; a KW model's on the straightforward path, so the
attention, the kernel assembly and the convolution are all counted) and CPU inference latency
against (a) (batch 64, eval, no grad, interleaved repetitions in this process, median).
The KW arms' fine-tuning recipe (temperature schedule, learning rates of cells and attention)
is ``RECIPE`` below; ``--sweep`` compares the variants of ``SWEEP`` on one seed.

    .venv/bin/python benchmarks/finetune.py            # the full run, 3 seeds (5 min on a Zen 5 core, 19 on a slower AVX2 one)
    .venv/bin/python benchmarks/finetune.py --quick    # a smoke run of every piece (< 2 min)
    .venv/bin/python benchmarks/finetune.py --sweep    # KW recipe variants, one seed, short
    .venv/bin/python benchmarks/finetune.py --net mobile   # the MobileNetV2-like net instead

Whether KW pays off depends on how much the original can still learn (README, "Does converting a
trained model pay off?"); the other regimes measured there:

    R=benchmarks/results
    .venv/bin/python benchmarks/finetune.py --finetune-epochs 2 --latency-reps 0 --out $R/finetune_2_epochs.json
    .venv/bin/python benchmarks/finetune.py --finetune-epochs 4 --latency-reps 0 --out $R/finetune_4_epochs.json
    .venv/bin/python benchmarks/finetune.py --finetune-epochs 8 --arms a b --latency-reps 0 --out $R/finetune_8_epochs.json
    .venv/bin/python benchmarks/finetune.py --finetune-epochs 4 --arms a c d --latency-reps 0 \
        --out $R/finetune_4_epochs_cells10.json      # and --finetune-epochs 8: finetune_8_epochs_cells10.json
    .venv/bin/python benchmarks/finetune.py --pretrain-epochs 6 --finetune-epochs 2 --latency-reps 0 \
        --out $R/finetune_converged.json
    .venv/bin/python benchmarks/finetune.py --train-images 0 --arms a b --seeds 2 --latency-reps 0 \
        --out $R/finetune_all_images.json

``--net mobile`` pre-trains ``fashion_mnist.MobileCNN`` instead, a depthwise-separable net that
only the planner's allocator takes well below 1x at b = 1/2, and writes
results/finetune_mobile.json; every results file holds that plan's ratio with and without the
allocator.

Needs ``torch-pruning`` (``pip install -e ".[bench]"``; ``make bench-finetune`` installs it).
Prints a table and writes benchmarks/results/finetune.json (atomically).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.metadata
import importlib.util
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make ``benchmarks.fashion_mnist`` importable
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import kwconvert  # noqa: E402
from benchmarks import fashion_mnist as fm  # noqa: E402
from benchmarks.results_io import write_json  # noqa: E402
from kwconvert import bench, execution  # noqa: E402
from kwconvert.methods.kernelwarehouse import native  # noqa: E402
from kwconvert.training import FINE_TUNE, parameter_groups  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ARMS = {"a": "original, fine-tuned", "b": "KW 1x", "c": "KW 1/2x", "d": "pruned to (c)'s params",
        "e": "ODConv 1x", "f": "ODConv 4x", "g": "KernelDNA", "h": "KernelDNA, parents fitted"}
#: The arms a plain run takes; the other methods' arms are asked for with --arms.
DEFAULT_ARMS = ["a", "b", "c", "d"]
BUDGETS = {"b": 1.0, "c": 0.5}
#: The other methods' arms: kwconvert.convert's method and options.
METHOD_ARMS = {"e": {"method": "odconv", "kernels": 1}, "f": {"method": "odconv", "kernels": 4},
               "g": {"method": "kerneldna"}, "h": {"method": "kerneldna", "fit_parent": True}}
#: Targets of issue 14: (b) >= (a) + 0.3 point; (c) >= (d) + 0.5 point and within 0.5 point of (a).
MARGIN_B_OVER_A, MARGIN_C_OVER_D, TOLERANCE_C_TO_A = 0.3, 0.5, 0.5


@dataclass(frozen=True)
class FinetuneRecipe:
    """Pre-training of the original, the fine-tuning every arm shares, and the KW arms' own settings."""
    train_images: int | None = field(default=12000, metadata={
        "help": "class-balanced training subset, used by pre-training and fine-tuning (None: all 60,000)"})
    pretrain_epochs: float = 3.0
    pretrain_batch_size: int = 32
    pretrain_lr: float = field(default=0.2, metadata={"help": "peak; warm-up then cosine (fashion_mnist.Recipe)"})
    finetune_epochs: float = field(default=0.75, metadata={"help": "every arm: the same steps, images, order"})
    finetune_batch_size: int = 32
    finetune_lr: float = field(default=0.02, metadata={"help": "peak for every parameter of (a) and (d), and the "
                                                                "base of the KW arms' multipliers"})
    weight_decay: float = 5e-4
    lr_warmup_fraction: float = 0.05
    # --- the KW arms (issue 14, point 2) ---
    kw_tau_fraction: float = field(default=0.0, metadata={
        "help": "tau falls 1 -> 0 over this fraction of the fine-tuning steps; 0: tau = 0 (serving) throughout"})
    kw_cell_lr: float = field(default=FINE_TUNE.cell_lr_scale, metadata={
        "help": "lr of the cells of warehouses at b >= 1 (KW 1x), times finetune_lr"})
    kw_fitted_cell_lr: float = field(default=FINE_TUNE.fitted_cell_lr_scale, metadata={
        "help": "lr of the cells of warehouses below b = 1 (KW 1/2x), times finetune_lr"})
    kw_attention_lr: float = field(default=FINE_TUNE.attention_lr_scale, metadata={
        "help": "attention's lr, times finetune_lr"})
    kw_attention_norm: str = field(default="auto", metadata={"help": "plan option attention_norm"})
    kw_calibration_images: int = field(default=512, metadata={
        "help": "training images the cells below b = 1 are fitted to the outputs on (kwconvert.calibrate; "
                "0: the kernels' SVD fit only)"})
    subset_seed: int = 0

    def stage(self, name: str) -> fm.Recipe:
        """The pre-training or fine-tuning part as a ``fashion_mnist.Recipe`` (SGD Nesterov)."""
        epochs, batch, lr = ((self.pretrain_epochs, self.pretrain_batch_size, self.pretrain_lr) if name == "pretrain"
                             else (self.finetune_epochs, self.finetune_batch_size, self.finetune_lr))
        return fm.Recipe(train_images=self.train_images, epochs=epochs, batch_size=batch, lr=lr,
                         weight_decay=self.weight_decay, lr_warmup_fraction=self.lr_warmup_fraction,
                         temperature_fraction=0.0, subset_seed=self.subset_seed)

    def multipliers(self) -> dict[str, float]:
        """The KW arms' learning rates, times ``finetune_lr`` (``make_optimizer``)."""
        return {"cells": self.kw_cell_lr, "fitted cells": self.kw_fitted_cell_lr, "attention": self.kw_attention_lr}

    def to_dict(self) -> dict:
        return asdict(self)


#: The defaults: ``kwconvert.training.FINE_TUNE`` (tau = 0 from the start, cells at 3x the lr and
#: 10x in warehouses below b = 1, attention at 1x), sized to under 30 minutes for 3 seeds on 2
#: cores.  How it was chosen: the sweep below (finetune_sweep*.json, seed 0, 6,000 images, 94
#: fine-tuning steps, the original 82.10 % -> 83.40 % fine-tuned) ran when a converted attention
#: held logits of L1 norm 1, where a logit step moves the mixture weights one for one: at attention
#: lr 1x the 1/2x model lost ground while fine-tuning (58.99 %), at 0.1x it reached 79.65 %, at
#: 0.01x 82.20 % (82.70 % with cells at 3x; frozen attention, cells 3x: 82.25 %); annealing tau
#: gained nothing.  The held logits now have an L1 norm of
#: ``kwconvert.methods.kernelwarehouse.layers.HELD_LOGIT_SCALE`` = 10, which slows the attention's
#: learning about 100-fold at the same lr: 1x there matched 0.01x at L1 norm 1 (README).
RECIPE = FinetuneRecipe()
#: Recipe variants ``--sweep`` fine-tunes (b) and (c) with, on one seed; name -> changed fields.
SWEEP: dict[str, dict] = {
    "tau 0, attention lr x1": {"kw_attention_lr": 1.0},
    "tau 0, attention lr x0.1": {"kw_attention_lr": 0.1},
    "tau 1->0 over 20 %, attention lr x1": {"kw_attention_lr": 1.0, "kw_tau_fraction": 0.2},
    "tau 0, attention lr x1, cells lr x1": {"kw_attention_lr": 1.0, "kw_cell_lr": 1.0, "kw_fitted_cell_lr": 1.0},
    "tau 0, attention frozen": {"kw_attention_lr": 0.0},
}
#: ``--quick``: every piece on a few hundred images, one seed, in about a minute.
QUICK = dict(train_images=1000, pretrain_epochs=1.0, finetune_epochs=0.5)


# =======================================================================================
# Data, training, testing
# =======================================================================================
def data(recipe: FinetuneRecipe, test_images: int | None) -> dict[str, tuple[Tensor, Tensor]]:
    images, labels = fm.load_split("train")
    keep = fm.balanced_subset(labels, recipe.train_images, seed=recipe.subset_seed)
    train = images[keep].contiguous(), labels[keep]
    images, labels = fm.load_split("test")
    keep = fm.balanced_subset(labels, test_images, seed=recipe.subset_seed)
    return {"train": train, "test": (images[keep].contiguous(), labels[keep])}


def make_optimizer(model: nn.Module, stage: fm.Recipe, multipliers: dict[str, float]) -> torch.optim.SGD:
    """SGD Nesterov over ``kwconvert.training.parameter_groups``: lr times ``multipliers[kind]``
    for the cells ("fitted cells": below b = 1, "cells" if not given) and the attention, weight
    decay on weights of rank >= 2 (reference impl.)."""
    groups = parameter_groups(model, stage.lr, weight_decay=stage.weight_decay,
                              cell_lr_scale=multipliers.get("cells", 1.0),
                              fitted_cell_lr_scale=multipliers.get("fitted cells"),  # None: the "cells" one
                              attention_lr_scale=multipliers.get("attention", 1.0))
    return torch.optim.SGD(groups, lr=stage.lr, momentum=stage.momentum, nesterov=True)


def train(model: nn.Module, images: Tensor, labels: Tensor, stage: fm.Recipe, seed: int, *,
          multipliers: dict[str, float] | None = None, tau_fraction: float = 0.0) -> dict:
    """``fashion_mnist.train`` (warm-up then cosine; the batches depend on ``seed`` only) with the
    KW arms' learning-rate ``multipliers`` and tau 1 -> 0 over ``tau_fraction`` of the steps
    (0: tau = 0, the serving temperature, throughout); tau ends at 0."""
    stage = dataclasses.replace(stage, temperature_fraction=tau_fraction)
    return fm.train(model, images, labels, stage, seed, optimizer=make_optimizer(model, stage, multipliers or {}))


def test(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    return fm.accuracy(fm.predict(model, images), labels)


# =======================================================================================
# The arms
# =======================================================================================
def convert(trained: nn.Module, budget: float, recipe: FinetuneRecipe, images: Tensor | None = None) -> nn.Module:
    """KW at ``budget`` from the trained model (weights preserved), at the serving temperature;
    below b = 1 the cells fit the layers' outputs on the first ``kw_calibration_images`` of
    ``images`` (the training set, class-balanced and shuffled), when given."""
    calibration = images[:recipe.kw_calibration_images] if images is not None and recipe.kw_calibration_images \
        else None
    model = fm.kernelwarehouse(trained, budget, init="preserve", inplace=False,
                               attention_norm=recipe.kw_attention_norm, calibration=calibration)
    kwconvert.set_temperature(model, 0.0)
    return model


def prune(trained: nn.Module, ratio: float) -> nn.Module:
    """A pruned copy: Torch-Pruning's MetaPruner, L2-magnitude importance of channel groups, the
    classifier's outputs kept (its inputs follow the last stage's channels)."""
    import torch_pruning as tp

    model = copy.deepcopy(trained).eval()
    if ratio > 0:
        pruner = tp.pruner.MetaPruner(model, fm.example_input()[0], importance=tp.importance.MagnitudeImportance(p=2),
                                      pruning_ratio=ratio, ignored_layers=[model.fc])
        pruner.step()
    return model


def prune_to(trained: nn.Module, target: int, tolerance: float, iterations: int = 16) -> tuple[nn.Module, dict]:
    """Search the pruning ratio whose parameter count is nearest ``target`` (bisection on the
    monotone, stepwise count, then the nearer of the two sides)."""
    low, high = 0.0, 0.9
    counts = {low: fm.parameter_count(trained), high: fm.parameter_count(prune(trained, high))}
    if not counts[high] <= target <= counts[low]:
        raise ValueError(f"pruning cannot reach {target:,} parameters (from {counts[low]:,} to {counts[high]:,})")
    for _ in range(iterations):
        middle = (low + high) / 2
        counts[middle] = fm.parameter_count(prune(trained, middle))
        low, high = (middle, high) if counts[middle] > target else (low, middle)
    ratio = min((low, high), key=lambda r: abs(counts[r] - target))
    model = prune(trained, ratio)
    error = fm.parameter_count(model) / target - 1
    return model, {"ratio": ratio, "params": fm.parameter_count(model), "target": target,
                   "relative_error": error, "within_tolerance": abs(error) <= tolerance,
                   "channels": [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]}


def macs(model: nn.Module) -> dict:
    """Multiply-accumulates for one image (FLOPs / 2).  KW layers run their straightforward path
    here: the fast path's compiled kernels are invisible to the counter, the arithmetic is the same."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), execution.reference_path(), counter:
        model.eval()(*fm.example_input())
    by_op = {str(op).removeprefix("aten."): int(n) // 2 for op, n in counter.get_flop_counts()["Global"].items()}
    return {"total": int(counter.get_total_flops()) // 2, "by_op": by_op}


@torch.no_grad()
def latency(models: dict[str, nn.Module], batch: int, reps: int, warmup: int = 3) -> dict[str, dict]:
    """Median forward seconds per model at ``batch``: repetitions interleaved (the order rotates each
    time, ``kwconvert.bench.interleaved``), after ``warmup`` calls that also let the KW layers time
    their paths for this shape."""
    x = torch.randn(batch, *fm.INPUT_SIZE, generator=torch.Generator().manual_seed(0))
    steps = {name: bench.make_step(model, "inference", x) for name, model in models.items()}
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = bench.interleaved(steps, reps)
    return {name: {"median_s": statistics.median(t), "min_s": min(t)} for name, t in times.items()}


def max_logit_diff(a: nn.Module, b: nn.Module, images: Tensor) -> float:
    with torch.inference_mode():
        return float((a.eval()(images) - b.eval()(images)).abs().max())


def run_seed(seed: int, recipe: FinetuneRecipe, sets: dict, arms: list[str], console: Console,
             latency_batch: int, latency_reps: int, prune_tolerance: float, net: str = "residual") -> dict:
    """Pre-train ``fashion_mnist.NETS[net]`` once, then each arm from a copy of the trained model;
    test, count, time."""
    images, labels = sets["test"]
    torch.manual_seed(seed)
    original = fm.NETS[net]()
    pretrain = train(original, *sets["train"], recipe.stage("pretrain"), seed)
    pretrained_accuracy = test(original, images, labels)
    console.log(f"seed {seed}: pre-trained {pretrained_accuracy:.2f}% ({pretrain['steps']} steps, "
                f"{pretrain['seconds']:.0f} s)")
    row: dict = {"seed": seed, "pretrain": pretrain, "pretrained_accuracy": pretrained_accuracy, "arms": {}}
    models: dict[str, nn.Module] = {}
    for arm in sorted(arms, key=lambda a: a != "c"):  # (c) first: (d) is pruned to its count
        start = time.perf_counter()
        info: dict = {}
        if arm == "a":
            model = copy.deepcopy(original)
        elif arm in BUDGETS:
            model = convert(original, BUDGETS[arm], recipe, sets["train"][0])
            info["max_abs_logit_diff_tau0"] = max_logit_diff(original, model, images[:100])
            plan = kwconvert.plan_of(model)
            info["init_error"] = {w.name: w.init_error for w in plan.warehouses}
        elif arm in METHOD_ARMS:
            model = kwconvert.convert(original, example_inputs=fm.example_input(), inplace=False, **METHOD_ARMS[arm])
            info["max_abs_logit_diff"] = max_logit_diff(original, model, images[:100])
            info["fit_error"] = {l.name: l.fit_error for l in kwconvert.plan_of(model).layers if l.parent}
            info["parent_fit_error"] = {s.layer: s.fit_error for s in kwconvert.plan_of(model).plain
                                        if s.fit_error is not None}
        else:
            target = (row["arms"]["c"]["params"] if "c" in row["arms"]
                      else fm.parameter_count(convert(original, BUDGETS["c"], recipe, sets["train"][0])))
            model, info["pruning"] = prune_to(original, target, prune_tolerance)
        info["compress_seconds"] = time.perf_counter() - start
        info["accuracy_before"] = pretrained_accuracy if arm == "a" else test(model, images, labels)
        kw = arm in BUDGETS
        fit = train(model, *sets["train"], recipe.stage("finetune"), seed + 1000,
                    multipliers=recipe.multipliers() if kw else None,
                    tau_fraction=recipe.kw_tau_fraction if kw else 0.0)
        info.update(finetune=fit, accuracy=test(model, images, labels), params=fm.parameter_count(model),
                    macs=macs(model))
        row["arms"][arm] = info
        models[arm] = model
        console.log(f"seed {seed} ({arm}) {ARMS[arm]}: {info['accuracy_before']:.2f}% -> {info['accuracy']:.2f}% "
                    f"(fine-tune {fit['seconds']:.0f} s)")
    if latency_reps > 0:
        timed = latency({arm: models[arm] for arm in sorted(models)}, latency_batch, latency_reps)
        for arm, numbers in timed.items():
            row["arms"][arm]["latency"] = numbers
    return row


# =======================================================================================
# Summary, targets, table
# =======================================================================================
def summarise(rows: list[dict], arms: list[str]) -> dict[str, dict]:
    summary = {}
    for arm in arms:
        runs = [r["arms"][arm] for r in rows]
        final = [r["accuracy"] for r in runs]
        before = [r["accuracy_before"] for r in runs]
        entry = {"name": ARMS[arm], "accuracies": final, "accuracy_mean": statistics.fmean(final),
                 "accuracy_std": statistics.stdev(final) if len(final) > 1 else 0.0,
                 "accuracy_before": before, "accuracy_before_mean": statistics.fmean(before),
                 "params": runs[0]["params"], "macs": runs[0]["macs"]["total"],
                 "finetune_seconds_mean": statistics.fmean(r["finetune"]["seconds"] for r in runs),
                 "finetune_steps": runs[0]["finetune"]["steps"]}
        if "a" in arms and all("latency" in r["arms"][arm] for r in rows):
            ratios = [r["arms"][arm]["latency"]["median_s"] / r["arms"]["a"]["latency"]["median_s"] for r in rows]
            entry["latency_ratio_per_seed"] = ratios
            entry["latency_ratio"] = statistics.median(ratios)
            entry["latency_ms"] = 1000 * statistics.median(r["arms"][arm]["latency"]["median_s"] for r in rows)
        if arm == "d":
            entry["pruning"] = [r["arms"]["d"]["pruning"] for r in rows]
        summary[arm] = entry
    return summary


def targets(summary: dict[str, dict]) -> dict[str, dict]:
    mean = {arm: s["accuracy_mean"] for arm, s in summary.items()}
    goals: dict[str, dict] = {}
    if {"a", "b"} <= mean.keys():
        delta = mean["b"] - mean["a"]
        goals[f"(b) >= (a) + {MARGIN_B_OVER_A}"] = {"delta_points": delta, "met": delta >= MARGIN_B_OVER_A}
    if {"c", "d"} <= mean.keys():
        delta = mean["c"] - mean["d"]
        goals[f"(c) >= (d) + {MARGIN_C_OVER_D}"] = {"delta_points": delta, "met": delta >= MARGIN_C_OVER_D}
    if {"a", "c"} <= mean.keys():
        delta = mean["c"] - mean["a"]
        goals[f"(c) within {TOLERANCE_C_TO_A} of (a)"] = {"delta_points": delta, "met": delta >= -TOLERANCE_C_TO_A}
    return goals


def table(summary: dict[str, dict], title: str) -> Table:
    out = Table(title=title)
    for column in ("arm", "after conv./pruning %", "final %", "per seed", "params", "MACs", "latency vs (a)",
                   "fine-tune s"):
        out.add_column(column, justify="left" if column == "arm" else "right")
    for arm, s in summary.items():
        latency_text = (f"{s['latency_ratio']:.2f}x ({s['latency_ms']:.1f} ms)" if "latency_ratio" in s else "")
        out.add_row(f"({arm}) {s['name']}", f"{s['accuracy_before_mean']:.2f}",
                    f"{s['accuracy_mean']:.2f} +- {s['accuracy_std']:.2f}",
                    " ".join(f"{a:.2f}" for a in s["accuracies"]), f"{s['params']:,}", f"{s['macs'] / 1e6:.2f} M",
                    latency_text, f"{s['finetune_seconds_mean']:.0f}")
    return out


def print_targets(out: Console, goals: dict[str, dict]) -> None:
    for name, goal in goals.items():
        out.print(f"target {name}: {'met' if goal['met'] else 'NOT met'} ({goal['delta_points']:+.2f} points)")


# =======================================================================================
# Command line
# =======================================================================================
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = RECIPE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--net", choices=list(fm.NETS), default="residual",
                        help="residual: ResidualCNN; mobile: MobileCNN (MobileNetV2-like)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds (0, 1, ...): one pre-training each")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=DEFAULT_ARMS,
                        help="(e) ODConv 1x, (f) ODConv 4x, (g) KernelDNA run only when named")
    parser.add_argument("--quick", action="store_true", help="a smoke run of every piece (< 2 min)")
    parser.add_argument("--sweep", action="store_true", help="fine-tune (b) and (c) with each SWEEP variant, one seed")
    parser.add_argument("--sweep-variants", nargs="+", choices=list(SWEEP), default=list(SWEEP), metavar="NAME",
                        help="--sweep: only these SWEEP variants")
    parser.add_argument("--train-images", type=int, default=d.train_images, help="0: all 60,000")
    parser.add_argument("--test-images", type=int, default=0, help="class-balanced test subset (0: all 10,000)")
    parser.add_argument("--pretrain-epochs", type=float, default=d.pretrain_epochs)
    parser.add_argument("--finetune-epochs", type=float, default=d.finetune_epochs)
    parser.add_argument("--finetune-lr", type=float, default=d.finetune_lr)
    parser.add_argument("--kw-tau-fraction", type=float, default=d.kw_tau_fraction,
                        help="KW arms: tau 1 -> 0 over this fraction of fine-tuning (0: tau = 0 throughout)")
    parser.add_argument("--kw-cell-lr", type=float, default=d.kw_cell_lr,
                        help="cells of warehouses at b >= 1, times --finetune-lr")
    parser.add_argument("--kw-fitted-cell-lr", type=float, default=d.kw_fitted_cell_lr,
                        help="cells of warehouses below b = 1, times --finetune-lr")
    parser.add_argument("--kw-attention-lr", type=float, default=d.kw_attention_lr, help="times --finetune-lr")
    parser.add_argument("--kw-attention-norm", choices=("auto", "batchnorm", "layernorm"), default=d.kw_attention_norm)
    parser.add_argument("--kw-calibration-images", type=int, default=d.kw_calibration_images,
                        help="training images the 1/2x cells are fitted to the outputs on (0: kernel fit only)")
    parser.add_argument("--latency-batch", type=int, default=64)
    parser.add_argument("--latency-reps", type=int, default=20, help="interleaved repetitions (0: no timing)")
    parser.add_argument("--prune-tolerance", type=float, default=0.01, help="relative parameter-count mismatch")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON (default results/finetune.json, finetune_quick.json, finetune_sweep.json; "
                             "finetune_mobile*.json for --net mobile)")
    args = parser.parse_args(argv)
    if args.quick:
        explicit = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:])}
        for key, value in QUICK.items():
            if f"--{key.replace('_', '-')}" not in explicit:
                setattr(args, key, value)
        if "--seeds" not in explicit:
            args.seeds = 1
        if "--test-images" not in explicit:
            args.test_images = 1000
        if "--latency-reps" not in explicit:
            args.latency_reps = 5
    if args.out is None:
        net = "" if args.net == "residual" else f"_{args.net}"
        args.out = RESULTS_DIR / f"finetune{net}{'_sweep' if args.sweep else '_quick' if args.quick else ''}.json"
    return args


def recipe_of(args: argparse.Namespace) -> FinetuneRecipe:
    return dataclasses.replace(RECIPE, train_images=args.train_images or None, pretrain_epochs=args.pretrain_epochs,
                               finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr,
                               kw_tau_fraction=args.kw_tau_fraction, kw_cell_lr=args.kw_cell_lr,
                               kw_fitted_cell_lr=args.kw_fitted_cell_lr,
                               kw_attention_lr=args.kw_attention_lr, kw_attention_norm=args.kw_attention_norm,
                               kw_calibration_images=args.kw_calibration_images)


def preservation_landed(net_name: str = "residual") -> float:
    """Max |logit difference| of an untrained net against its KW 1x conversion at tau = 0 (about 1e-6
    when ``convert(init="preserve")`` keeps the function at every temperature)."""
    torch.manual_seed(0)
    net = fm.NETS[net_name]().eval()
    return max_logit_diff(net, convert(net, 1.0, RECIPE), torch.randn(4, *fm.INPUT_SIZE))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(stderr=True)
    if fm.report_missing(console):
        return 1
    if "d" in args.arms and not args.sweep and importlib.util.find_spec("torch_pruning") is None:
        console.print("[bold red]error:[/] torch-pruning is not installed; run "
                      "`.venv/bin/pip install -e '.[bench]'` (or `make bench-finetune`)", highlight=False)
        return 1
    torch.set_num_threads(args.threads)
    recipe = recipe_of(args)
    sets = data(recipe, args.test_images or None)
    preserved = preservation_landed(args.net)
    console.log(f"KW 1x at tau = 0 vs the original, untrained net: max |logit diff| {preserved:.2g} "
                f"({'function preserved' if preserved < 1e-3 else 'NOT preserved at tau 0'})")
    load_start = os.getloadavg()
    start = time.perf_counter()
    common = {"dataset": "Fashion-MNIST (Debian dataset-fashion-mnist)", "test_images": args.test_images or 10000,
              "model": {**fm.net_config(args.net), "kw_options": {"stem": "plain", "init": "preserve"}},
              "plan_at_half": fm.plan_ratios(fm.NETS[args.net]()),
              "preserved_at_tau0_max_abs_logit_diff": preserved, "threads": args.threads,
              "latency": {"batch": args.latency_batch, "reps": args.latency_reps,
                          "how": "eval, no_grad, interleaved repetitions in one process, median"},
              "macs_how": "FlopCounterMode on one 1x28x28 image, FLOPs / 2; KW on the straightforward path"}
    out = Console() if sys.stdout.isatty() else Console(width=150)  # a log file gets the table unwrapped
    if args.sweep:
        return sweep(args, recipe, sets, console, out, common, start, load_start)
    rows = [run_seed(seed, recipe, sets, args.arms, console, args.latency_batch, args.latency_reps,
                     args.prune_tolerance, args.net) for seed in range(args.seeds)]
    seconds = time.perf_counter() - start
    arms = [a for a in ARMS if a in args.arms]
    summary = summarise(rows, arms)
    goals = targets(summary)
    write_json({**common, "recipe": recipe.to_dict(), "arms": {a: ARMS[a] for a in arms}, "summary": summary,
                "targets": goals, "wall_seconds": seconds,
                "machine": machine(load_start), "runs": rows}, args.out)
    images = recipe.train_images or 60000
    out.print(table(summary, f"Fashion-MNIST fine-tuning of {common['model']['class']}, {args.seeds} seed(s), "
                             f"{images} training images: "
                             f"pre-train {recipe.pretrain_epochs:g} epoch(s), fine-tune {recipe.finetune_epochs:g}; "
                             f"{seconds / 60:.1f} min"))
    print_targets(out, goals)
    half = common["plan_at_half"]
    out.print(f"plan at b = 1/2: {half['ratio']:.3f}x of the parameters with the allocator, "
              f"{half['ratio_without_allocator']:.3f}x without (allocate=False)")
    out.print(f"written to {args.out}")
    return 0


def sweep(args, recipe: FinetuneRecipe, sets: dict, console: Console, out: Console, common: dict,
          start: float, load_start) -> int:
    """One pre-training (seed 0), then (b) and (c) fine-tuned with each SWEEP variant, plus (a)."""
    arms = [a for a in ("a", "b", "c") if a in args.arms]
    results = {}
    torch.manual_seed(0)
    original = fm.NETS[args.net]()
    pretrain = train(original, *sets["train"], recipe.stage("pretrain"), 0)
    images, labels = sets["test"]
    base = test(original, images, labels)
    console.log(f"pre-trained {base:.2f}% ({pretrain['seconds']:.0f} s)")
    chosen = {name: SWEEP[name] for name in args.sweep_variants}
    for name, changes in {"plain": {}, **chosen}.items():
        variant = dataclasses.replace(recipe, **changes)
        for arm in (["a"] if name == "plain" else [a for a in arms if a != "a"]):
            model = copy.deepcopy(original) if arm == "a" else convert(original, BUDGETS[arm], variant, sets["train"][0])
            before = test(model, images, labels)
            kw = arm in BUDGETS
            fit = train(model, *sets["train"], variant.stage("finetune"), 1000,
                        multipliers=variant.multipliers() if kw else None,
                        tau_fraction=variant.kw_tau_fraction if kw else 0.0)
            results[f"{name} / {arm}"] = {"variant": name, "arm": arm, "changes": changes, "accuracy_before": before,
                                           "accuracy": test(model, images, labels), "finetune": fit}
            console.log(f"{name} ({arm}): {before:.2f}% -> {results[f'{name} / {arm}']['accuracy']:.2f}% "
                        f"({fit['seconds']:.0f} s)")
    seconds = time.perf_counter() - start
    write_json({**common, "recipe": recipe.to_dict(), "pretrained_accuracy": base, "pretrain": pretrain,
                "variants": chosen, "results": results, "wall_seconds": seconds,
                "machine": machine(load_start)}, args.out)
    view = Table(title=f"KW fine-tuning variants, seed 0, {recipe.train_images or 60000} images, fine-tune "
                       f"{recipe.finetune_epochs:g} epoch(s); pre-trained {base:.2f}%; {seconds / 60:.1f} min")
    for column in ("variant", "arm", "after conversion %", "final %", "fine-tune s"):
        view.add_column(column, justify="left" if column in ("variant", "arm") else "right")
    for r in results.values():
        view.add_row(r["variant"], ARMS[r["arm"]], f"{r['accuracy_before']:.2f}", f"{r['accuracy']:.2f}",
                     f"{r['finetune']['seconds']:.0f}")
    out.print(view)
    out.print(f"written to {args.out}")
    return 0


def machine(load_start) -> dict:
    try:
        pruning_version = importlib.metadata.version("torch-pruning")
    except importlib.metadata.PackageNotFoundError:
        pruning_version = None
    return {"cpu": bench.cpu_description(), "cpus": os.cpu_count(), "load_average_start": load_start,
            "load_average_end": os.getloadavg(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_pruning": pruning_version, "native_kernel": native.available(), "native_isa": native.isa()}


if __name__ == "__main__":
    sys.exit(main())
