"""How long planning takes: resnet50 (median of several runs) and every torchvision classifier.

Times ``kwconvert.plan(model, budget)`` (trace + ShapeProp forward + grouping + budget
guard), excluding imports and model construction.  Targets: resnet50 < 1 s, all
torchvision classification models < 60 s in total.

    .venv/bin/python benchmarks/plan_speed.py [--budget 1] [--runs 7] [--models resnet18 ...]

Prints a rich table and writes benchmarks/results/plan_speed.json (atomically).
"""
from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torchvision
from rich.console import Console
from rich.table import Table

from kwconvert.plan import plan
from results_io import write_json  # sibling module: the script's folder is on sys.path

RESULTS = Path(__file__).resolve().parent / "results" / "plan_speed.json"
RESNET50_TARGET_S = 1.0
ALL_MODELS_TARGET_S = 60.0


def time_plan(model: torch.nn.Module, budget: float, name: str):
    start = time.perf_counter()
    result = plan(model, budget, model_name=name)
    return time.perf_counter() - start, result


def resnet50_runs(budget: float, runs: int) -> list[float]:
    model = torchvision.models.resnet50(weights=None)
    time_plan(model, budget, "resnet50")  # warm-up: first-call costs of torch, not of planning
    return [time_plan(model, budget, "resnet50")[0] for _ in range(runs)]


def all_models(budget: float, names: list[str], console: Console) -> list[dict]:
    rows = []
    for name in names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = torchvision.models.get_model(name, weights=None)
        row = {"model": name}
        try:
            seconds, result = time_plan(model, budget, name)
            row.update(seconds=round(seconds, 4), warehouses=len(result.warehouses), plain=len(result.plain),
                       params_baseline=result.params_baseline, params_converted=result.params_converted,
                       ratio=round(result.params_converted / result.params_baseline, 4), error=None)
        except Exception as err:  # a benchmark records failures instead of stopping
            row.update(seconds=None, error=f"{type(err).__name__}: {err}")
        rows.append(row)
        console.log(f"{name}: {row.get('seconds')} s" + (f"  ERROR {row['error']}" if row["error"] else ""))
        del model
        gc.collect()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=7, help="resnet50 runs (median reported)")
    parser.add_argument("--models", nargs="*", help="torchvision names [default: all classification models]")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    names = args.models or torchvision.models.list_models(module=torchvision.models)

    runs = resnet50_runs(args.budget, args.runs)
    rows = all_models(args.budget, names, console)
    timed = [r["seconds"] for r in rows if r["seconds"] is not None]
    failures = [r for r in rows if r["error"]]
    summary = {
        "resnet50_median_s": round(statistics.median(runs), 4),
        "resnet50_runs_s": [round(r, 4) for r in runs],
        "resnet50_target_s": RESNET50_TARGET_S,
        "all_models_total_s": round(sum(timed), 2),
        "all_models_target_s": ALL_MODELS_TARGET_S,
        "models": len(rows),
        "failures": len(failures),
    }
    write_json({"budget": args.budget, "torch": torch.__version__, "torchvision": torchvision.__version__,
                "python": platform.python_version(), "threads": torch.get_num_threads(),
                "summary": summary, "per_model": rows}, args.out)

    table = Table(title=f"kwconvert plan time at b = {args.budget:g}")
    for column in ("model", "seconds", "warehouses", "plain", "params ratio"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in sorted(rows, key=lambda r: -(r["seconds"] or 0)):
        table.add_row(row["model"], f"{row['seconds']:.3f}" if row["seconds"] is not None else "error",
                      str(row.get("warehouses", "")), str(row.get("plain", "")),
                      f"{row['ratio']:.3f}" if row.get("ratio") is not None else "")
    out = Console()
    out.print(table)
    out.print(f"resnet50: median {summary['resnet50_median_s']:.3f} s over {len(runs)} runs "
              f"(target < {RESNET50_TARGET_S:g} s)")
    out.print(f"{len(rows)} models: {summary['all_models_total_s']:.1f} s in total "
              f"(target < {ALL_MODELS_TARGET_S:g} s), {len(failures)} failed")
    out.print(f"written to {args.out}")
    ok = summary["resnet50_median_s"] < RESNET50_TARGET_S and summary["all_models_total_s"] < ALL_MODELS_TARGET_S
    return 0 if ok and not failures else 1


if __name__ == "__main__":
    sys.exit(main())
