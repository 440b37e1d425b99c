"""Resolve a model name to a freshly built module, and load a user's checkpoint into it.

Sources (recorded in a saved model's ``kwconvert.json`` so it can be rebuilt):
``resnet50`` or ``torchvision:resnet50``, ``timm:NAME``, ``pkg.module:callable``.
Models are always built with random weights (no download: kwconvert runs offline); a
user's trained weights come as a file, read without unpickling.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import os
import pickle
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn


class ModelSourceError(ValueError):
    """The model name or callable cannot give a module (a usage error)."""


class CheckpointError(ValueError):
    """A weights file is missing, unreadable, unsafe, or does not fit the model."""


def canonical_source(spec: str) -> str:
    """``resnet50`` -> ``torchvision:resnet50``; other forms are returned unchanged."""
    spec = spec.strip()
    if ":" in spec:
        return spec
    return f"torchvision:{spec}"


def build_model(spec: str, **model_args: Any) -> nn.Module:
    """Build the model a source string names, with random weights; ``model_args`` go to its
    constructor (``num_classes=10``, ``width_mult=0.5``: what the builder, timm's
    ``create_model`` or the callable accepts)."""
    source = canonical_source(spec)
    downloading = sorted(set(model_args) & {"weights", "weights_backbone", "pretrained", "pretrained_cfg"})
    if downloading:
        raise ModelSourceError(f"the model argument {downloading[0]} would fetch weights, which kwconvert never "
                               "does: pass a checkpoint file with --weights (load_weights) instead")
    prefix, _, name = source.partition(":")
    if prefix == "torchvision":
        return _build_torchvision(name, model_args)
    if prefix == "timm":
        return _build_timm(name, model_args)
    return _build_from_callable(prefix, name, model_args)


def _constructed(spec: str, build: Callable[[], Any], model_args: dict[str, Any]) -> Any:
    """``build()``, where a constructor refusing the user's ``model_args`` is said in one line."""
    try:
        return build()
    except TypeError as err:
        if not model_args:
            raise
        raise ModelSourceError(f"{spec} does not take the model arguments "
                               f"{', '.join(f'{k}={v!r}' for k, v in model_args.items())}: {err}") from None


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


#: Arguments whose default torchvision warns about (a FutureWarning on every build), given
#: as the value the default takes today.
_STATED_DEFAULTS = {"googlenet": {"init_weights": True}, "inception_v3": {"init_weights": True}}


def _build_torchvision(name: str, model_args: dict[str, Any]) -> nn.Module:
    import torchvision

    known = torchvision.models.list_models()
    if name not in known:
        raise ModelSourceError(
            f"unknown torchvision model '{name}'{_suggest(name, known)} "
            "(use a torchvision name, timm:NAME or pkg.module:callable)")
    builder = torchvision.models.get_model_builder(name)
    kwargs: dict[str, Any] = {**_STATED_DEFAULTS.get(name, {}), **model_args, "weights": None}
    # Detection and segmentation builders fetch backbone weights unless told not to.
    if "weights_backbone" in inspect.signature(builder).parameters:
        kwargs["weights_backbone"] = None
    return _constructed(f"torchvision:{name}", lambda: builder(**kwargs), model_args)


def _build_timm(name: str, model_args: dict[str, Any]) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise ModelSourceError(f"unknown timm model '{name}'{_suggest(name, timm.list_models())}")
    return _constructed(f"timm:{name}", lambda: timm.create_model(name, **{**model_args, "pretrained": False}),
                        model_args)


def _import_here_too(module_name: str):
    """Import ``module_name`` from the import path, else from the current directory: a
    package beside the user, as ``python -m`` would find it (a console script's path lacks
    the directory it runs in).  Looked up last, so a local file never shadows an installed
    package that is found."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        here, top = os.getcwd(), module_name.partition(".")[0]
        beside = (Path(here) / top).is_dir() or (Path(here) / f"{top}.py").is_file()
        if err.name != top or not beside or here in sys.path or "" in sys.path:
            raise
    sys.path.append(here)
    return importlib.import_module(module_name)


def _build_from_callable(module_name: str, attr: str, model_args: dict[str, Any]) -> nn.Module:
    spec = f"{module_name}:{attr}"
    try:
        module = _import_here_too(module_name)
    except ImportError as err:
        raise ModelSourceError(f"cannot import '{module_name}' for {spec}: {err}") from None
    factory: Callable[[], Any] | None = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ModelSourceError(f"'{module_name}' has no callable '{attr}' (for {spec})")
    try:
        model = factory(**model_args)
    except Exception as err:  # the user's code: report it, whatever it raised
        raise ModelSourceError(f"{spec} raised {type(err).__name__}: {err}") from None
    if not isinstance(model, nn.Module):
        raise ModelSourceError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def default_input_size(model: nn.Module) -> tuple[int, ...]:
    """The input one sample of this model expects, (C, H, W); 3x224x224 unless it says.

    torchvision's video models take clips (C, T, H, W): 16 frames, at the crop size their
    weights were trained on (112 for the ResNets, 224 for S3D, MViT and Swin3D)."""
    if type(model).__module__.startswith("torchvision.models.video"):
        side = 112 if type(model).__name__ == "VideoResNet" else 224
        return (3, 16, side, side)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return tuple(int(v) for v in cfg["input_size"])
    image_size = getattr(model, "image_size", None)  # torchvision ViT
    if isinstance(image_size, int):
        return (3, image_size, image_size)
    if type(model).__name__ == "Inception3":
        return (3, 299, 299)
    return (3, 224, 224)


def check_input_size(model: nn.Module, size: tuple[int, ...]) -> None:
    """A ValueError when ``size`` cannot be one sample's input of ``model``'s first
    convolution: a Conv2d takes C,H,W, a Conv1d C,L, a Conv3d C,T,H,W."""
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))), None)
    if first is None:
        return
    wanted = {1: "C,L", 2: "C,H,W", 3: "C,T,H,W"}[len(first.kernel_size)]
    if len(size) != len(first.kernel_size) + 1:
        raise ValueError(f"input size {','.join(map(str, size))} has {len(size)} numbers, but the model starts "
                         f"with a {type(first).__name__}, which takes {wanted} (e.g. "
                         f"{first.in_channels},{','.join(['64'] * len(first.kernel_size))})")


def parse_input_size(text: str) -> tuple[int, ...]:
    """``"3,224,224"`` -> (3, 224, 224); every entry a positive integer."""
    try:
        size = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        size = ()
    if not size or any(v < 1 for v in size):
        raise ValueError(f"input size '{text}' is not a list of positive integers like 3,224,224")
    return size


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint without running code: safetensors, or torch.load(weights_only=True)."""
    return _unwrap_state_dict(_read_tensor_file(Path(path), "weights file", "a PyTorch state dict"), Path(path))


def read_inputs(path: str | Path) -> torch.Tensor:
    """A batch of model inputs from a file, read without running code: a .safetensors file
    holding one tensor (or one named ``inputs``), or a tensor saved with torch.save."""
    path = Path(path)
    data = _read_tensor_file(path, "calibration file", "a tensor saved by torch.save")
    if isinstance(data, dict):
        tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
        data = data["inputs"] if isinstance(data.get("inputs"), torch.Tensor) else tensors[0] if len(tensors) == 1 \
            else None
    if not isinstance(data, torch.Tensor) or not data.is_floating_point() or data.dim() < 2:
        raise CheckpointError(f"'{path}' must hold one floating-point tensor of inputs, N x C x ... (or one "
                              "named 'inputs')")
    return data


def _read_tensor_file(path: Path, kind: str, torch_kind: str) -> Any:
    """What a .safetensors file or a torch.save file holds, loaded without unpickling code."""
    if not path.is_file():
        raise CheckpointError(f"{kind} '{path}' " + ("is not a file" if path.exists() else "does not exist"))
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"cannot read '{path}' as safetensors: {err}") from None
    with open(path, "rb") as handle:
        head = handle.read(4)
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):  # torch.save: zip, or legacy pickle
        raise CheckpointError(f"cannot read '{path}' as {torch_kind}: it is not a file written by "
                              "torch.save (neither a zip archive nor a pickle)")
    try:
        with warnings.catch_warnings():  # torch's note on the pickle protocol is noise here
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"'{path}' holds objects that are not plain tensors ({_unpickler_reason(err)}) and was not "
            "loaded (kwconvert never unpickles code); save a state_dict or use .safetensors") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"cannot read '{path}' as {torch_kind}: {err}") from None


def _unpickler_reason(err: Exception) -> str:
    """torch's reason for refusing a pickle ("Trying to load unsupported GLOBAL posix.system
    ..."), without the paragraphs around it that advise loading the file unsafely."""
    advice = ("Weights only load failed", "Please file an issue", "Check the documentation")
    paragraphs = [" ".join(p.split()) for p in str(err).split("\n\n")]
    reason = next((p for p in paragraphs if p and not p.startswith(advice)), "")
    return reason[:200].rstrip(".") or "refused by torch.load(weights_only=True)"


def _unwrap_state_dict(data: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(data, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(data.get(key), dict):
                data = data[key]
                break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"'{path}' is not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in data.items()}


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a checkpoint into the (unconverted) model strictly, naming mismatched keys."""
    state = read_state_dict(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected {_first(unexpected)}")
    if wrong_shape:
        k = wrong_shape[0]
        problems.append(f"shape of {k} is {tuple(state[k].shape)}, model has {tuple(expected[k].shape)}")
    if problems:
        raise CheckpointError(f"'{path}' does not match the model: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)


def _first(keys: list[str], count: int = 3) -> str:
    more = f" and {len(keys) - count} more" if len(keys) > count else ""
    return ", ".join(keys[:count]) + more
