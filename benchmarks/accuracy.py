"""Accuracy on real data: Fashion-MNIST, a small residual CNN, baseline against KernelWarehouse.

Trains the same network with one recipe (``RECIPE`` below, on ``benchmarks/fashion_mnist.py``) as the
baseline, KW 1x, KW 1/2x, KW 4x (from scratch, the paper's init), KW 1x and 1/2x with a LayerNorm attention, and vanilla dynamic
convolution at 4x (the planner's ``mode="dynamic_conv"``: whole kernels as cells, one
warehouse per layer, n = 4), several seeds each, and reports test accuracy mean +- std,
parameters and time.  It also checks the weight-preserving conversion: the trained
baseline (first seed) converted with ``init="preserve"`` at b = 1 must start at the
baseline's accuracy before any fine-tuning.

    .venv/bin/python benchmarks/accuracy.py                 # the full run (~11 min on 2 quiet cores)
    .venv/bin/python benchmarks/accuracy.py --train-images 500 --test-images 1000 --seeds 1
    .venv/bin/python benchmarks/accuracy.py --net mobile    # the MobileNetV2-like net, b = 1/2

``--net mobile`` trains ``fashion_mnist.MobileCNN`` instead (``NET_VARIANTS["mobile"]`` unless
``--variants`` says otherwise) and writes results/accuracy_mobile.json; it shows what the
planner's allocator, which alone takes that net below 0.95x at b = 1/2, costs in accuracy.
Both results files hold the plan's ratio at b = 1/2 with and without the allocator.

Runs are spread over ``--jobs`` processes of ``--threads`` threads each (2 x 1 by
default: on 2 cores two single-threaded runs do more work than one two-threaded run,
and a single thread does not collapse when other processes share the machine).
Prints a table and writes benchmarks/results/accuracy.json (atomically).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make ``benchmarks.fashion_mnist`` importable
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import kwconvert  # noqa: E402
from benchmarks import fashion_mnist as fm  # noqa: E402
from benchmarks.results_io import write_json  # noqa: E402

RESULTS = {"residual": Path(__file__).resolve().parent / "results" / "accuracy.json",
           "mobile": Path(__file__).resolve().parent / "results" / "accuracy_mobile.json"}
#: name -> plan options (an empty dict is the unconverted baseline).
VARIANTS: dict[str, dict] = {
    "baseline": {},
    "KW 1x": {"budget": 1.0},
    "KW 1/2x": {"budget": 0.5},
    "KW 4x": {"budget": 4.0},
    "DY-Conv 4x": {"budget": 4.0, "mode": "dynamic_conv"},
    # The paper's attention normalises its hidden layer with BatchNorm, which at its random start
    # spreads the attentions of the images of a batch apart (README); LayerNorm does not.
    "KW 1x, LN attention": {"budget": 1.0, "attention_norm": "layernorm"},
    "KW 1/2x, LN attention": {"budget": 0.5, "attention_norm": "layernorm"},
    # The paper's layout at b everywhere: what KW 1/2x costs without the allocator's savings.
    "KW 1/2x, no allocator": {"budget": 0.5, "allocate": False},
    # The other methods (issue 17), from scratch with their authors' init; asked for with --variants.
    # ODConv's T falls 30 -> 1 over the same warm-up as KW's tau (fashion_mnist.set_temperatures).
    "ODConv 1x": {"method": "odconv", "kernels": 1},
    "ODConv 4x": {"method": "odconv", "kernels": 4},
    "KernelDNA": {"method": "kerneldna"},
}
#: ``--net``'s default variants (the residual net's are those of results/accuracy.json).  The mobile
#: net's show what the allocator's savings at b = 1/2 cost against the paper's layout at 1/2.
NET_VARIANTS = {"residual": [v for v in VARIANTS if v != "KW 1/2x, no allocator" and "method" not in VARIANTS[v]],
                "mobile": ["baseline", "KW 1/2x", "KW 1/2x, no allocator"]}
#: The one recipe every variant trains with: fashion_mnist's defaults (12,000 images, SGD Nesterov,
#: weight decay 5e-4, 5 % warm-up then cosine, tau 1 -> 0 over the first 10 % of the steps as in the
#: paper) for 2 epochs at batch 16 and a peak learning rate of 0.2.  The KW attention learns slowly:
#: CAF divides the logits by their L1 norm (about 6 at init, growing in training), so an SGD step
#: moves the attentions by about lr / |z|_1^2.  At lr 0.05, batch 32 and 1 epoch (375 steps, tau at
#: 0 after 37) they never left their random start, one sample's kernels unlike the next one's, and
#: KW 1x lost 12 points.  Batch 16 at lr 0.2 (the baseline is as good there as at 0.05) gives 4x the
#: steps for twice the images seen; see README "Accuracy on real data".
RECIPE = fm.Recipe(epochs=2.0, batch_size=16, lr=0.2)
#: Targets of the issue: KW 1x >= baseline; KW 1/2x within this many points, with fewer parameters.
HALF_BUDGET_TOLERANCE = 0.5

_DATA: dict[tuple, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}


def data(recipe: fm.Recipe, test_images: int | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The training subset and the test set, read once per process."""
    key = (recipe.train_images, recipe.subset_seed, test_images)
    if key not in _DATA:
        images, labels = fm.load_split("train")
        keep = fm.balanced_subset(labels, recipe.train_images, seed=recipe.subset_seed)
        train = images[keep].contiguous(), labels[keep]
        images, labels = fm.load_split("test")
        keep = fm.balanced_subset(labels, test_images, seed=recipe.subset_seed)
        _DATA.clear()  # one data set at a time
        _DATA[key] = {"train": train, "test": (images[keep].contiguous(), labels[keep])}
    return _DATA[key]


def build(variant: str, seed: int, net: str, net_options: dict) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = fm.NETS[net](**net_options)
    options = dict(VARIANTS[variant])
    if not options:
        return model
    if "method" in options:
        return kwconvert.convert(model, init="random", example_inputs=fm.example_input(), **options)
    return fm.kernelwarehouse(model, options.pop("budget"), init="random", **options)


def run_one(variant: str, seed: int, recipe: fm.Recipe, net: str, net_options: dict,
            test_images: int | None, threads: int, preserve_check: bool) -> dict:
    """Train and test one (variant, seed); the baseline's first seed also runs the preserve check."""
    torch.set_num_threads(threads)
    sets = data(recipe, test_images)
    model = build(variant, seed, net, net_options)
    row: dict = {"variant": variant, "seed": seed, "params": fm.parameter_count(model)}
    if variant != "baseline":
        plan = kwconvert.plan_of(model)
        row["warehouses"] = [{"name": w.name, "m_t": w.m_t, "n": w.n, "layers": len(w.layers)}
                             for w in plan.warehouses]
        row["plain"] = [s.layer for s in plan.plain]
        row["notes"] = list(plan.notes)
    row.update(fm.train(model, *sets["train"], recipe, seed))
    images, labels = sets["test"]
    start = time.perf_counter()
    predictions = fm.predict(model, images)
    row["test_seconds"] = time.perf_counter() - start
    row["accuracy"] = fm.accuracy(predictions, labels)
    if preserve_check:
        row["preserve"] = check_preserve(model, images, labels, predictions)
    return row


def check_preserve(trained: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                   predictions: torch.Tensor) -> dict:
    """The trained baseline converted with init="preserve" at b = 1, tested before any fine-tuning."""
    converted = fm.kernelwarehouse(trained, 1.0, init="preserve", inplace=False).eval()
    with torch.inference_mode():
        sample = images[:100]
        max_diff = float((trained.eval()(sample) - converted(sample)).abs().max())
    converted_predictions = fm.predict(converted, images)
    return {"budget": 1.0, "tau": 1.0, "accuracy": fm.accuracy(converted_predictions, labels),
            "baseline_accuracy": fm.accuracy(predictions, labels),
            "predictions_changed": int((converted_predictions != predictions).sum()),
            "max_abs_logit_diff": max_diff, "params": fm.parameter_count(converted)}


def summarise(rows: list[dict], variants: list[str]) -> list[dict]:
    summary = []
    for variant in variants:
        runs = [r for r in rows if r["variant"] == variant]
        accuracies = [r["accuracy"] for r in runs]
        summary.append({
            "variant": variant, "seeds": [r["seed"] for r in runs], "accuracies": accuracies,
            "accuracy_mean": statistics.fmean(accuracies),
            "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "params": runs[0]["params"],
            "train_seconds_mean": statistics.fmean(r["seconds"] for r in runs),
            "test_seconds_mean": statistics.fmean(r["test_seconds"] for r in runs),
            "steps": runs[0]["steps"],
        })
    return summary


def targets(summary: list[dict], preserve: dict | None) -> dict[str, dict]:
    """The issue's targets, each with the measured numbers and whether it was met."""
    by_name = {s["variant"]: s for s in summary}
    base = by_name.get("baseline")
    result: dict[str, dict] = {}
    for suffix in ("", ", LN attention"):
        if base and f"KW 1x{suffix}" in by_name:
            delta = by_name[f"KW 1x{suffix}"]["accuracy_mean"] - base["accuracy_mean"]
            result[f"KW 1x{suffix} >= baseline"] = {"delta_points": delta, "met": delta >= 0}
        if base and f"KW 1/2x{suffix}" in by_name:
            half = by_name[f"KW 1/2x{suffix}"]
            delta = half["accuracy_mean"] - base["accuracy_mean"]
            result[f"KW 1/2x{suffix} within 0.5 point, fewer params"] = {
                "delta_points": delta, "params_ratio": half["params"] / base["params"],
                "met": delta >= -HALF_BUDGET_TOLERANCE and half["params"] < base["params"]}
    if preserve:
        result["preserve b=1 starts at the baseline's accuracy"] = {
            "delta_points": preserve["accuracy"] - preserve["baseline_accuracy"],
            "met": preserve["accuracy"] == preserve["baseline_accuracy"]}
    return result


def table(summary: list[dict], recipe: fm.Recipe, seconds: float, model_class: str = "ResidualCNN") -> Table:
    base = next((s for s in summary if s["variant"] == "baseline"), None)
    images = recipe.train_images or 60000
    out = Table(title=f"Fashion-MNIST test accuracy of {model_class}, {len(summary[0]['seeds'])} seed(s), "
                      f"{images} training images x {recipe.epochs:g} epoch(s); {seconds / 60:.1f} min")
    for column in ("model", "accuracy %", "per seed", "params", "vs baseline", "train s", "test s"):
        out.add_column(column, justify="left" if column == "model" else "right")
    for s in summary:
        ratio = f"{s['params'] / base['params']:.2f}x" if base else ""
        out.add_row(s["variant"], f"{s['accuracy_mean']:.2f} +- {s['accuracy_std']:.2f}",
                    " ".join(f"{a:.2f}" for a in s["accuracies"]), f"{s['params']:,}", ratio,
                    f"{s['train_seconds_mean']:.0f}", f"{s['test_seconds_mean']:.0f}")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = RECIPE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--net", choices=list(fm.NETS), default="residual",
                        help="residual: ResidualCNN; mobile: MobileCNN (MobileNetV2-like)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None,
                        help="default: NET_VARIANTS[--net]")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per variant (0, 1, ...)")
    parser.add_argument("--train-images", type=int, default=defaults.train_images,
                        help="class-balanced training subset (0: all 60,000)")
    parser.add_argument("--test-images", type=int, default=0, help="class-balanced test subset (0: all 10,000)")
    parser.add_argument("--epochs", type=float, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default=defaults.optimizer)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--temperature-fraction", type=float, default=defaults.temperature_fraction,
                        help="tau falls 1 -> 0 over this fraction of training (paper: 0.1)")
    parser.add_argument("--widths", default=None, help="residual net: channels of the three stages (32,64,128)")
    parser.add_argument("--blocks", type=int, default=None, help="residual net: residual blocks per stage (1)")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (processes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--no-preserve-check", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="default results/accuracy.json, "
                                                                 "results/accuracy_mobile.json for --net mobile")
    args = parser.parse_args(argv)
    if args.net != "residual" and (args.widths or args.blocks):
        parser.error("--widths and --blocks shape the residual net only")
    if args.variants is None:
        args.variants = list(NET_VARIANTS[args.net])
    args.out = args.out or RESULTS[args.net]
    return args


def net_options(args: argparse.Namespace) -> dict:
    """Constructor arguments of the chosen net (the mobile net's defaults are its design)."""
    if args.net != "residual":
        return {}
    return {"widths": tuple(int(w) for w in (args.widths or "32,64,128").split(",")),
            "blocks_per_stage": args.blocks or 1}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(stderr=True)
    if fm.report_missing(console):
        return 1
    recipe = dataclasses.replace(RECIPE, train_images=args.train_images or None, epochs=args.epochs,
                                 batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                                 temperature_fraction=args.temperature_fraction)
    options = net_options(args)
    test_images = args.test_images or None
    variants = list(args.variants)
    # Longest runs first so that the last ones to finish are short.
    order = sorted(variants, key=lambda v: v == "baseline")
    tasks = [(v, seed, recipe, args.net, options, test_images, args.threads,
              v == "baseline" and seed == 0 and not args.no_preserve_check)
             for v in order for seed in range(args.seeds)]
    load_start = os.getloadavg()
    start = time.perf_counter()
    rows = []
    if args.jobs <= 1:
        for task in tasks:
            rows.append(run_one(*task))
            _log(console, rows[-1], start)
    else:
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(run_one, *task) for task in tasks]
            for future in futures:
                rows.append(future.result())
                _log(console, rows[-1], start)
    seconds = time.perf_counter() - start
    rows.sort(key=lambda r: (variants.index(r["variant"]), r["seed"]))
    summary = summarise(rows, variants)
    preserve = next((r["preserve"] for r in rows if "preserve" in r), None)
    goals = targets(summary, preserve)
    torch.manual_seed(0)
    plan_at_half = fm.plan_ratios(fm.NETS[args.net](**options))
    model_config = fm.net_config(args.net, **options)
    write_json({
        "dataset": "Fashion-MNIST (Debian dataset-fashion-mnist)", "data_dir": str(fm.DATA_DIR),
        "recipe": recipe.to_dict(), "test_images": test_images or 10000,
        "model": {**model_config, "kw_options": {"stem": "plain", "init": "random"}},
        "plan_at_half": plan_at_half,
        "variants": {v: VARIANTS[v] for v in variants},
        "summary": summary, "preserve_check": preserve, "targets": goals,
        "wall_seconds": seconds, "jobs": args.jobs, "threads_per_job": args.threads,
        "machine": {"cpus": os.cpu_count(), "load_average_start": load_start, "load_average_end": os.getloadavg(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "runs": rows,
    }, args.out)

    out = Console()
    out.print(table(summary, recipe, seconds, model_config["class"]))
    out.print(f"plan at b = 1/2: {plan_at_half['ratio']:.3f}x of the parameters with the allocator, "
              f"{plan_at_half['ratio_without_allocator']:.3f}x without (allocate=False)")
    if preserve:
        out.print(f"preserve check: baseline (seed 0) {preserve['baseline_accuracy']:.2f}% -> converted at b = 1, "
                  f"tau = 1, before fine-tuning {preserve['accuracy']:.2f}% ({preserve['predictions_changed']} "
                  f"predictions changed, max |logit diff| {preserve['max_abs_logit_diff']:.2g})")
    for name, goal in goals.items():
        numbers = ", ".join(f"{k} {v:+.2f}" if k == "delta_points" else f"{k} {v:.2f}"
                            for k, v in goal.items() if k != "met")
        out.print(f"target {name}: {'met' if goal['met'] else 'NOT met'} ({numbers})")
    out.print(f"written to {args.out}")
    return 0


def _log(console: Console, row: dict, start: float) -> None:
    console.log(f"{row['variant']} seed {row['seed']}: {row['accuracy']:.2f}% (train {row['seconds']:.0f} s, "
                f"test {row['test_seconds']:.0f} s; {time.perf_counter() - start:.0f} s so far)")


if __name__ == "__main__":
    sys.exit(main())
