"""Planning, the second stage: LayerGraph + method + budget -> :class:`Plan`.

* :mod:`.schema`: the ``Plan`` dataclasses and their JSON (the hand-off to rewriting);
* :mod:`.checks`: the consistency a plan must have, checked whenever one is read or applied;
* :mod:`.tables`: a plan as rich tables (``Plan.table()``);
* :mod:`.budget`: what a budget means for each method;
* :mod:`.planner`: :func:`plan`, which hands a traced model to its method's planning rules
  (``kwconvert.methods.<method>.planning``).
"""
from .budget import check_budget, parse_budget
from .checks import check_consistent
from .planner import check_options, plan
from .schema import PLAN_FORMAT, DynamicLayerPlan, LayerPlan, Plan, StaticLayer, WarehousePlan
from ..formatting import count

__all__ = ["PLAN_FORMAT", "DynamicLayerPlan", "LayerPlan", "Plan", "StaticLayer", "WarehousePlan",
           "check_budget", "check_consistent", "check_options", "count", "parse_budget", "plan"]
