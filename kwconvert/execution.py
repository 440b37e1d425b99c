"""Which way the per-sample convolutions run: the path forced in this thread (``use_path``) or
in the whole process (``KWCONVERT_PATH``), and the straightforward formulations.

Every method's per-sample layers read it (:mod:`kwconvert.per_sample`); KernelWarehouse's
layers have fast paths of their own (:mod:`kwconvert.methods.kernelwarehouse.path_choice`)
and take the forced one where they can.  ``"reference"`` is the paper's formulation
(assemble per-sample kernels, one convolution with the batch folded into the groups);
``"im2col"`` the same with the convolution as im2col and one batched product, which no op
attribute ties to the batch (torch.export / ONNX with a dynamic batch).
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Generic, Iterator, TypeVar

import torch

T = TypeVar("T")

#: Ways a KW Conv2d can run (:mod:`kwconvert.methods.kernelwarehouse.paths`); the first two
#: are the straightforward formulations every per-sample layer has, for any conv rank.
PATHS = ("reference", "im2col", "grouped", "folded", "conv", "matmul", "bmm", "premix", "native", "inline")
_STRAIGHTFORWARD = ("reference", "im2col")
def _path_from_environment() -> str | None:
    """``KWCONVERT_PATH=<path>`` forces that path in every thread of the process, with no timing:
    runs that must repeat to the last bit in another process (a training run resumed from a
    checkpoint picks no other path than the run it continues)."""
    path = os.environ.get("KWCONVERT_PATH") or None
    if path is not None and path not in PATHS:
        raise ValueError(f"KWCONVERT_PATH must be one of {', '.join(PATHS)}, got {path!r}")
    return path


class ThreadSetting(Generic[T]):
    """A setting made for the calling thread (or task) only, by ``set_to``: a context variable,
    so that a thread changing it for a comparison does not change what another thread serves.

    A graph being compiled reads it too, but torch 2.13's Dynamo cannot trace
    ``ContextVar.get`` (a graph break: an error under ``fullgraph=True``).  Inside a trace the
    setting is the value last set in any thread, a plain attribute that Dynamo takes as a
    constant and guards on: the same value where a model is compiled and run in one thread.
    """

    def __init__(self, name: str, default: T) -> None:
        self._var: contextvars.ContextVar[T] = contextvars.ContextVar(name, default=default)
        self._last = default

    def get(self) -> T:
        if torch.compiler.is_compiling():
            return self._last
        return self._var.get()

    @contextlib.contextmanager
    def set_to(self, value: T) -> Iterator[None]:
        token, previous = self._var.set(value), self._last
        self._last = value
        try:
            yield
        finally:
            self._var.reset(token)
            self._last = previous


#: The path forced by ``use_path`` in this thread; its default is ``KWCONVERT_PATH``'s.
_forced: ThreadSetting[str | None] = ThreadSetting("kwconvert_path", _path_from_environment())


@contextlib.contextmanager
def use_path(path: str | None) -> Iterator[None]:
    """Run every KW layer on ``path`` inside the block, in this thread (``None``: the fastest,
    by timing).

    A path a layer cannot take (``"matmul"`` for a grouped convolution, anything but the
    reference for Conv1d/3d) falls back to ``"grouped"`` for that layer.
    """
    if path is not None and path not in PATHS:
        raise ValueError(f"path must be one of {PATHS} or None, got {path!r}")
    with _forced.set_to(path):
        yield


def reference_path() -> contextlib.AbstractContextManager:
    """The straightforward path of the paper's reference implementation, for comparison:
    assemble per-sample kernels with one matrix product, then one convolution with the batch
    folded into the groups."""
    return use_path("reference")


def is_reference() -> bool:
    """Whether KW layers take the straightforward formulation (``"reference"`` or ``"im2col"``)."""
    return _forced.get() in _STRAIGHTFORWARD


def is_im2col() -> bool:
    return _forced.get() == "im2col"


def forced() -> str | None:
    """The path forced in this thread (``use_path``), else ``KWCONVERT_PATH``'s, else None."""
    return _forced.get()
