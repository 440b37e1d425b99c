"""Save and load converted models: safetensors for tensors, JSON for the plan, never pickle.

A saved model is a directory with ``model.safetensors`` (every parameter and buffer, a
shared tensor stored once) and ``kwconvert.json`` (plan, source, input size, versions,
format, and the weights' SHA-256).  Loading rebuilds the base model from its source (or
takes the user's instance), applies the plan, and loads the weights strictly.

Format 2 names the tensors as ``model.state_dict()`` does: a warehouse's cells under every
layer that shares them (``layer1.0.conv1.warehouse.cells``, the others aliases of it).
Format 1 kept them once, in a ``kw_warehouses`` module of the model; it still loads.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__, methods
from .files import umask
from .methods.kernelwarehouse.layers import Warehouse
from .methods.kernelwarehouse.path_choice import restore_choices, saved_choices
from .methods.kernelwarehouse.serving import half_names, restore_half
from .models import build_model
from .plan import Plan
from .rewrite import PLAN_ATTR, convert, plan_of

#: Version of the saved directory's layout; bump when a field changes meaning.
FORMAT_VERSION = 2
#: Where format 1 kept the cells: ``kw_warehouses.<warehouse name, dots as _>.cells``.
FORMAT_1_WAREHOUSES = "kw_warehouses."
WEIGHTS_FILE = "model.safetensors"
META_FILE = "kwconvert.json"
#: Where a saved or loaded model keeps its constructor's arguments (``save(model_args=...)``).
MODEL_ARGS_ATTR = "_kwconvert_model_args"


class SavedModelError(ValueError):
    """A saved directory is missing, damaged, tampered with, or does not fit the model."""


def save(model: nn.Module, directory: str | os.PathLike, *, source: str | None = None,
         input_size: tuple[int, ...] | None = None, model_args: dict[str, Any] | None = None) -> Path:
    """Write a converted model to ``directory`` atomically; return the directory.

    ``source`` (``torchvision:resnet18``, ``timm:NAME``, ``pkg.module:callable``) and
    ``model_args`` (its constructor's arguments, e.g. ``num_classes``) let ``load`` rebuild
    the base model alone; a loaded model remembers both, so a later save keeps them.

    Everything is first written to a hidden sibling directory, then swapped in with two
    renames, so a save killed half-way leaves the previous save (or nothing) in place;
    ``load`` also recovers the previous save if the kill fell between the two renames.
    """
    plan = plan_of(model)
    target = check_target(directory)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _sweep_leftovers(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as err:
        raise SavedModelError(f"cannot write {target}: {err.strerror or type(err).__name__}") from None
    try:
        tensors, aliases = _unique_tensors(model.state_dict())
        weights_path = staging / WEIGHTS_FILE
        from safetensors.torch import save_file
        save_file(tensors, str(weights_path), metadata={"format": str(FORMAT_VERSION)})
        meta = _metadata(plan, source or plan.model, input_size or plan.input_size, aliases,
                         _sha256(weights_path), _temperatures(model))
        meta["model_args"] = dict(model_args if model_args is not None else getattr(model, MODEL_ARGS_ATTR, {}))
        meta["paths"] = saved_choices(model)  # each layer's timed path (kwconvert.tune): no timing after load
        meta["half_warehouses"] = half_names(model)  # served from float16 copies (kwconvert.half_warehouses)
        (staging / META_FILE).write_text(json.dumps(meta, indent=2))
        _fsync_dir(staging)
        _apply_umask(staging)
        _swap_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _remember_source(model, meta["source"], meta["model_args"])
    return target


def load(directory: str | os.PathLike, model: nn.Module | None = None, *,
         device: str | torch.device | None = None) -> nn.Module:
    """Rebuild a saved model: base model (from its source, or ``model``) + plan + weights.

    ``device`` (torch.load's ``map_location``) moves the loaded model there; by default it
    stays where it was built (the CPU, or ``model``'s device).
    """
    device = checked_device(device) if device is not None else None
    path = _resolve_saved(Path(directory))
    meta = read_metadata(path)
    try:  # a plan edited by hand is refused here, before any model is built
        plan = Plan.from_dict(meta["plan"])
    except ValueError as err:
        raise SavedModelError(f"{path}: the saved plan does not fit the model: {err}") from None
    if model is None:
        if not meta.get("source"):
            raise SavedModelError(f"{path} records no model source; pass the unconverted model: "
                                  "kwconvert.load(directory, model=...), or --model MODEL on the command line")
        model_args = meta.get("model_args") or {}
        if not isinstance(model_args, dict):
            raise SavedModelError(f"{path}: model_args in {META_FILE} is not an object; the save is damaged")
        model = build_model(meta["source"], **model_args)
    state = _read_weights(path, meta)
    try:
        converted = convert(model, plan, init="none")
    except ValueError as err:
        raise SavedModelError(f"{path}: the saved plan does not fit the model: {err}") from None
    if meta["format"] < 2:
        state = _cells_under_their_layers(converted, state)
    _load_strict(converted, state, path)
    _set_temperatures(converted, meta.get("temperatures", {}), path)
    _remember_source(converted, meta.get("source"), meta.get("model_args", {}))
    half = meta.get("half_warehouses", [])
    if isinstance(half, list):
        restore_half(converted, half)
    paths = meta.get("paths", {})
    if isinstance(paths, dict):  # saves of 2026-12-01 listed choices per configuration: timed again
        restore_choices(converted, paths)
    return converted.to(device) if device is not None else converted


def _remember_source(model: nn.Module, source: str | None, model_args: dict[str, Any]) -> None:
    """Let the model's plan name its source (and the model keep its constructor's arguments),
    so that a model loaded, fine-tuned and saved again still records how to rebuild it
    (``load(dir)`` without ``model=``)."""
    plan = plan_of(model)
    if source and plan.model != source:
        setattr(model, PLAN_ATTR, dataclasses.replace(plan, model=source))
    if source:
        setattr(model, MODEL_ARGS_ATTR, dict(model_args))


def checked_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device that exists here, or a ValueError saying why not.

    Checked before anything is built: a misspelt or absent device (``cuda`` on a machine
    without one) should fail in a second, not after the model was rebuilt.
    """
    try:
        device = torch.device(device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, TypeError) as err:
        reason = str(err).strip().split(". ")[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"device '{device}' cannot be used here: {reason}") from None
    return device


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """The saved ``kwconvert.json``, checked for format and required fields."""
    path = _resolve_saved(Path(directory)) / META_FILE
    if not path.is_file():
        raise SavedModelError(f"{path.parent} has no {META_FILE}; is it a kwconvert save?")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SavedModelError(f"{path} is not valid JSON ({err}); the save is damaged") from None
    if not isinstance(meta, dict) or "format" not in meta or "plan" not in meta:
        raise SavedModelError(f"{path} lacks the 'format' or 'plan' field; the save is damaged")
    if not isinstance(meta["format"], int) or meta["format"] > FORMAT_VERSION:
        raise SavedModelError(f"{path} has format {meta['format']}, newer than this kwconvert reads "
                              f"({FORMAT_VERSION}); upgrade kwconvert")
    return meta


def check_saved(directory: str | os.PathLike) -> dict[str, Any]:
    """``read_metadata`` plus the weights file's checksum: a save that ``kwconvert show`` trusts.

    Builds no model, so it is cheap; a plan that does not fit the model is found by ``load``.
    """
    path = _resolve_saved(Path(directory))
    meta = read_metadata(path)
    _check_weights_file(path, meta)
    return meta


def _temperatures(model: nn.Module) -> dict[str, float]:
    """Each dynamic layer's temperature by qualified name (KW's tau, ODConv's T).

    It is a plain attribute, not a tensor, so the weights file does not hold it; without
    it a model trained past its warm-up (tau = 0) would load at tau = 1 and compute
    something else.
    """
    return {name: methods.temperature_of(layer) for name, layer in methods.temperature_layers(model).items()}


def _set_temperatures(model: nn.Module, temperatures: Any, path: Path) -> None:
    """Give the loaded layers their saved temperatures (saves without any stay at tau = 1)."""
    if not isinstance(temperatures, dict):
        raise SavedModelError(f"{path / META_FILE}: 'temperatures' must map layer names to numbers")
    layers = methods.temperature_layers(model)
    for name, tau in temperatures.items():
        layer = layers.get(name)
        if layer is None:
            raise SavedModelError(f"{path / META_FILE}: temperature for '{name}', which is not a KW or ODConv "
                                  "layer of the model; the save is damaged")
        try:
            methods.set_temperature_of(layer, tau)
        except (TypeError, ValueError) as err:
            raise SavedModelError(f"{path / META_FILE}: layer '{name}': {err}") from None


def _metadata(plan: Plan, source: str, input_size, aliases: dict[str, str], digest: str,
              temperatures: dict[str, float]) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "source": source if ":" in (source or "") else None,
        "input_size": list(input_size) if input_size else None,
        "budget": plan.budget,
        "options": plan.options,
        "versions": {"kwconvert": __version__, "torch": torch.__version__},
        "weights": {"file": WEIGHTS_FILE, "sha256": digest, "aliases": aliases},
        "temperatures": temperatures,
        "plan": plan.to_dict(),
    }


def _unique_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store each tensor once: a tensor reachable under two names becomes an alias."""
    kept: dict[tuple, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tuple(tensor.stride()), tensor.dtype) if tensor.numel() else None
        if key is not None and key in kept:
            aliases[name] = kept[key]
            continue
        if key is not None:
            kept[key] = name
        tensors[name] = tensor.detach().contiguous().clone() if _shares_storage(tensor) else tensor.detach().contiguous()
    return tensors, aliases


def _shares_storage(tensor: torch.Tensor) -> bool:
    return tensor.numel() != tensor.untyped_storage().nbytes() // max(tensor.element_size(), 1)


def _check_weights_file(path: Path, meta: dict[str, Any]) -> Path:
    """The weights file of a save, present and matching its recorded SHA-256."""
    record = meta.get("weights")
    if not isinstance(record, dict) or not {"file", "sha256"} <= set(record):
        raise SavedModelError(f"{path / META_FILE} lacks the weights' file name or checksum; the save is damaged")
    weights = path / record["file"]
    if not weights.is_file():
        raise SavedModelError(f"{path} has no {weights.name}; the save is incomplete")
    if _sha256(weights) != record["sha256"]:
        raise SavedModelError(f"{weights} does not match the checksum in {META_FILE}: "
                              "the file was truncated or changed; save the model again")
    return weights


def _read_weights(path: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    weights = _check_weights_file(path, meta)
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise SavedModelError(f"cannot read {weights}: {err}") from None
    for alias, original in meta["weights"].get("aliases", {}).items():
        state[alias] = state[original]
    return state


def _cells_under_their_layers(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A format-1 state with each warehouse's cells under every path that reaches it now.

    Format 1 held each warehouse once, in a ``kw_warehouses`` ModuleDict keyed by its name;
    the layers now hold it themselves, one shared tensor under each layer's name.  Keys no
    warehouse claims stay, so ``_load_strict`` reports them.
    """
    state = dict(state)
    claimed = set()
    for name, module in model.named_modules(remove_duplicate=False):
        if not isinstance(module, Warehouse):
            continue
        old = f"{FORMAT_1_WAREHOUSES}{module.name.replace('.', '_')}.cells"
        if old in state:
            state[f"{name}.cells"] = state[old]
            claimed.add(old)
    for old in claimed:
        del state[old]
    return state


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        first = (missing or unexpected or shapes)[0]
        kind = "missing" if missing else "unexpected" if unexpected else "of another shape"
        raise SavedModelError(f"{path}: weights do not fit the planned model ({kind}: {first}); "
                              "the save is damaged or from another model")
    model.load_state_dict(state, strict=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    for child in directory.iterdir():
        with open(child, "rb") as handle:
            os.fsync(handle.fileno())


def _apply_umask(directory: Path) -> None:
    """Give the staged save the permissions a plain mkdir / open would (mkdtemp's are 0700)."""
    mask = umask()
    directory.chmod(0o777 & ~mask)
    for child in directory.iterdir():
        child.chmod(0o666 & ~mask)


def check_target(directory: str | os.PathLike, replace: bool = True) -> Path:
    """``directory`` as a place a save can go, or a ``SavedModelError`` saying why not: checked
    before a conversion starts, so that a bad ``--out`` fails in a second, not after it.

    It may be absent (its nearest existing parent must be a writable directory), an empty
    directory, or a kwconvert save (replaced only with ``replace``); anything else is refused.
    """
    target = Path(directory)
    if target.exists():
        if not target.is_dir():
            raise SavedModelError(f"{target} is a file, not a directory; choose another --out")
        if (target / META_FILE).is_file():
            if not replace:
                raise SavedModelError(f"{target} holds a kwconvert save already; --force replaces it")
        elif any(target.iterdir()):
            raise SavedModelError(f"{target} exists and is not a kwconvert save; choose another --out")
    parent = target.parent.absolute()
    while not parent.exists():
        parent = parent.parent
    try:  # what the save will do there: make a directory (os.access would not see /proc's refusal)
        os.rmdir(tempfile.mkdtemp(prefix=f".{target.name}.probe-", dir=parent))
    except OSError as err:
        raise SavedModelError(f"cannot write {target}: {parent} is not a writable directory "
                              f"({err.strerror or type(err).__name__})") from None
    return target


def _swap_into_place(staging: Path, target: Path) -> None:
    if not target.exists():
        os.replace(staging, target)
        return
    if not (target / META_FILE).is_file() and any(target.iterdir()):
        raise SavedModelError(f"{target} exists and is not a kwconvert save; choose another --out")
    previous = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    previous.rmdir()
    os.replace(target, previous)
    os.replace(staging, target)
    shutil.rmtree(previous, ignore_errors=True)


def _sweep_leftovers(target: Path) -> None:
    """Tidy what a killed save of ``target`` left (one writer per target is assumed).

    A kill between the two renames of the swap leaves only the previous save, renamed:
    it is put back first.  Half-written staging directories are then removed.
    """
    if not target.exists():
        previous = _previous_saves(target)
        if previous:
            os.replace(previous[-1], target)
    for leftover in target.parent.glob(f".{target.name}.*-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _previous_saves(target: Path) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)


def _resolve_saved(path: Path) -> Path:
    """The save at ``path``; or the previous one if a save was killed between its renames."""
    if path.exists():
        return path
    with contextlib.suppress(OSError):
        previous = _previous_saves(path)
        if previous:
            return previous[-1]
    raise SavedModelError(f"{path} does not exist")
