"""Lets torchvision import where its compiled operators cannot load (``make test-torch-range``).

The torchvision 0.28.0 wheel on this machine's disk is built against torch's CUDA build, and
the torch 2.13.0 wheel is the CPU one: torchvision's ``_C`` library then fails to load (it
links ``libtorch_cuda``), which torchvision tolerates, but its ``import`` still registers fake
kernels for ``torchvision::nms`` and ``qnms``, which fails when no library declared them.
Declaring their schemas (no kernel) first lets the models import; only detection's box
operators stay missing, so the test that runs a detector is left out of that run.

The Makefile copies this file into that venv's site-packages with a ``.pth`` line importing
it, so that every interpreter of the run (pytest's workers, the CLI and examples run as
subprocesses) gets it; it declares the schemas when torchvision is first imported, so an
interpreter that never imports torchvision does not import torch for it either.
"""
import importlib.abc
import sys


class _DeclareFirst(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            import torch
            global _schemas
            _schemas = torch.library.Library("torchvision", "DEF")
            _schemas.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _schemas.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        return None  # the normal finders import it


sys.meta_path.insert(0, _DeclareFirst())
