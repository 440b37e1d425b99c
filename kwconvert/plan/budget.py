"""Budgets: what ``--budget`` means for each method, written as a number or a fraction."""
from __future__ import annotations

import math
from typing import Any


def parse_budget(text: str | float) -> float:
    """The budget b from "0.5", "1/2", "4" (or "1/2x", "4x" as the paper writes them)."""
    raw = str(text).strip()
    body = raw[:-1] if raw.lower().endswith("x") else raw
    try:
        numerator, _, denominator = body.partition("/")
        value = float(numerator) / float(denominator) if denominator else float(numerator)
        check_budget(value)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"budget must be a positive finite number such as 0.5, 1/2, 1 or 4, "
                         f"got {raw!r}") from None
    return value


def check_budget(budget: float) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not (
            math.isfinite(budget) and budget > 0):
        raise ValueError(f"budget must be a positive finite number, got {budget!r}")
    return float(budget)


def kernels_of(budget: float | str | None, kernels: Any) -> int:
    """ODConv's kernels per layer, from ``kernels=`` or the budget (its "Nx"), which must agree."""
    if kernels is not None and (isinstance(kernels, bool) or not isinstance(kernels, int) or kernels < 1):
        raise ValueError(f"ODConv option kernels must be a positive integer, got {kernels!r}")
    if isinstance(budget, bool):
        raise ValueError(f"ODConv's budget is its kernels per layer, a whole number >= 1: got {budget}")
    if budget is not None:
        value = parse_budget(budget) if isinstance(budget, str) else budget
        if not float(value).is_integer() or value < 1:
            raise ValueError(f"ODConv's budget is its kernels per layer, a whole number >= 1: got {budget}")
        if kernels is not None and kernels != int(value):
            raise ValueError(f"ODConv: budget {budget} and kernels={kernels} disagree; give one")
        return int(value)
    return 1 if kernels is None else kernels


def method_budget(method: str, budget: float | str | None, options: dict[str, Any]) -> float:
    """The plan's budget for ``method`` (ODConv's: its kernels per layer; KernelDNA's: 1), with
    ``options`` completed where the method reads the budget (``mode``, ``kernels``)."""
    if method == "dynamic_conv" and options.setdefault("mode", "dynamic_conv") != "dynamic_conv":
        raise ValueError(f"method 'dynamic_conv' is mode 'dynamic_conv', not {options['mode']!r}")
    if method == "odconv":
        options["kernels"] = kernels_of(budget, options.get("kernels"))
        budget = float(options["kernels"])
    elif method == "kerneldna":
        if budget is not None and (isinstance(budget, bool) or budget not in (1, "1")):
            raise ValueError(f"KernelDNA takes no budget (got {budget}): its children share their parents' "
                             "kernels (options share=, children_per_parent=)")
        budget = 1.0
    elif budget is None:
        raise ValueError(f"a {method} plan needs a budget: plan(model, 1), plan(model, '1/2')")
    return parse_budget(budget) if isinstance(budget, str) else check_budget(budget)
