"""What a graph being compiled reads of a layer's eager path choices (:mod:`.path_choice`).

Imported only from inside a torch.compile trace: marking a function for the compiler imports
``torch._dynamo`` (1.2 s here), which no eager process should pay for.
"""
from __future__ import annotations

import torch


@torch.compiler.assume_constant_result
def choices_at_trace(layer) -> tuple:
    """``layer.path_choices`` as ``((input key, path), ...)`` when the graph is traced, a constant of
    the graph.  Read as a dict, the trace would guard on it, and each choice a later eager call
    adds would fail the guard and compile the graph again."""
    return tuple(layer.path_choices.items())
