"""Save and load: safetensors + JSON, a round trip is bit-identical, damage is detected,
and a save killed half-way leaves the previous one loadable."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors import safe_open

import kwconvert
from kwconvert.io import META_FILE, WEIGHTS_FILE, SavedModelError, read_metadata
from kwconvert.methods.kernelwarehouse import path_choice

from .helpers import input_dependent


def converted_resnet18(budget: float = 1.0):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    return kwconvert.convert(model, budget, model_name="torchvision:resnet18")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = converted_resnet18(0.5).eval()
    directory = tmp_path_factory.mktemp("save") / "r18"
    kwconvert.save(model, directory)
    return model, directory


def test_round_trip_gives_bit_identical_outputs(saved):
    model, directory = saved
    loaded = kwconvert.load(directory, model=torchvision.models.resnet18(weights=None, num_classes=10)).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert kwconvert.plan_of(loaded).to_json() == kwconvert.plan_of(model).to_json()


def test_load_rebuilds_from_the_recorded_source(tmp_path):
    model = kwconvert.convert(torchvision.models.resnet18(weights=None), 1.0).eval()
    kwconvert.save(model, tmp_path / "m", source="torchvision:resnet18")
    loaded = kwconvert.load(tmp_path / "m").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert read_metadata(tmp_path / "m")["source"] == "torchvision:resnet18"


def test_a_loaded_fine_tuned_and_saved_again_model_keeps_its_source(tmp_path):
    model = kwconvert.convert(torchvision.models.resnet18(weights=None), 1.0)  # the API: no name given
    kwconvert.save(model, tmp_path / "first", source="torchvision:resnet18")
    loaded = kwconvert.load(tmp_path / "first").train()
    loaded(torch.randn(4, 3, 32, 32)).logsumexp(1).mean().backward()
    torch.optim.SGD(loaded.parameters(), lr=1e-3).step()  # a fine-tuning step
    kwconvert.save(loaded, tmp_path / "again")  # no source given this time
    assert read_metadata(tmp_path / "again")["source"] == "torchvision:resnet18"
    again = kwconvert.load(tmp_path / "again").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x), loaded.eval()(x))


def test_a_tuned_model_loads_with_its_paths_and_serves_without_timing(tmp_path, monkeypatch):
    model = converted_resnet18(1.0).eval()
    x = torch.randn(2, 3, 48, 48)
    path_choice.clear_caches()
    kwconvert.tune(model, x)
    kwconvert.save(model, tmp_path / "m")
    chosen = path_choice.chosen_paths(model)
    convs = sum(isinstance(module, kwconvert.KWConv2d) for module in model.modules())
    assert len(read_metadata(tmp_path / "m")["paths"]) == len(chosen) == convs == 19  # all but the stem
    path_choice.clear_caches()  # as in a fresh serving process
    loaded = kwconvert.load(tmp_path / "m", model=torchvision.models.resnet18(weights=None, num_classes=10)).eval()
    assert path_choice.chosen_paths(loaded) == chosen

    def no_timing(*args, **kwargs):
        raise AssertionError("a loaded tuned model timed a path")

    monkeypatch.setattr(path_choice, "_fastest", no_timing)
    with torch.no_grad():
        loaded(x)


def test_temperatures_survive_the_round_trip(tmp_path):
    """A model trained past its warm-up runs at tau = 0; loaded at tau = 1 it would compute
    something else."""
    model = input_dependent(converted_resnet18(1.0)).eval()  # as if fine-tuned: tau matters
    kwconvert.set_temperature(model, 0.0)
    model.layer1[0].conv1.tau = 0.25  # layers may differ
    kwconvert.save(model, tmp_path / "m")
    loaded = kwconvert.load(tmp_path / "m", model=torchvision.models.resnet18(weights=None, num_classes=10)).eval()
    assert loaded.layer1[0].conv1.tau == 0.25 and loaded.layer4[1].conv2.tau == 0.0
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    meta = json.loads((tmp_path / "m" / META_FILE).read_text())
    meta["temperatures"]["layer1.0.conv1"] = 7.0
    (tmp_path / "m" / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(SavedModelError, match=r"layer 'layer1.0.conv1': temperature must lie in \[0, 1\]"):
        kwconvert.load(tmp_path / "m", model=torchvision.models.resnet18(weights=None, num_classes=10))


def test_files_and_metadata(saved):
    model, directory = saved
    assert sorted(p.name for p in directory.iterdir()) == [META_FILE, WEIGHTS_FILE]
    meta = json.loads((directory / META_FILE).read_text())
    for key in ("format", "plan", "budget", "options", "versions", "input_size", "source", "temperatures"):
        assert key in meta
    assert meta["versions"]["torch"] == torch.__version__
    with safe_open(str(directory / WEIGHTS_FILE), "pt") as handle:
        keys = list(handle.keys())
    cells = [k for k in keys if k.endswith(".cells")]
    assert len(cells) == len(kwconvert.plan_of(model).warehouses)  # each warehouse once
    assert set(keys) | set(meta["weights"]["aliases"]) == set(model.state_dict())


def test_no_pickle_is_written_or_read(saved):
    _, directory = saved
    assert (directory / WEIGHTS_FILE).read_bytes()[:8] != b"\x80\x04\x95"[:8]
    json.loads((directory / META_FILE).read_text())


def copy_save(source: Path, target: Path) -> Path:
    target.mkdir()
    for child in source.iterdir():
        (target / child.name).write_bytes(child.read_bytes())
    return target


def test_truncated_weights_are_detected(saved, tmp_path):
    directory = copy_save(saved[1], tmp_path / "cut")
    data = (directory / WEIGHTS_FILE).read_bytes()
    (directory / WEIGHTS_FILE).write_bytes(data[: len(data) // 3])
    with pytest.raises(SavedModelError, match="truncated or changed"):
        kwconvert.load(directory, model=torchvision.models.resnet18(weights=None, num_classes=10))


def test_missing_files_are_detected(saved, tmp_path):
    directory = copy_save(saved[1], tmp_path / "nometa")
    (directory / META_FILE).unlink()
    with pytest.raises(SavedModelError, match="has no kwconvert.json"):
        kwconvert.load(directory)
    directory = copy_save(saved[1], tmp_path / "noweights")
    (directory / WEIGHTS_FILE).unlink()
    with pytest.raises(SavedModelError, match="has no model.safetensors"):
        kwconvert.load(directory, model=torchvision.models.resnet18(weights=None, num_classes=10))
    with pytest.raises(SavedModelError, match="does not exist"):
        kwconvert.load(tmp_path / "nowhere")


def test_tampered_plan_and_newer_format_are_refused(saved, tmp_path):
    directory = copy_save(saved[1], tmp_path / "tampered")
    meta = json.loads((directory / META_FILE).read_text())
    meta["plan"]["warehouses"][0]["m"][0] += 1
    (directory / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(SavedModelError, match="plan does not fit the model"):
        kwconvert.load(directory, model=torchvision.models.resnet18(weights=None, num_classes=10))
    meta["format"] = 99
    (directory / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(SavedModelError, match="newer than this kwconvert reads"):
        kwconvert.load(directory)


def rewrite_as_format_1(model: torch.nn.Module, directory: Path) -> None:
    """Rewrite a save in format 1's layout: the layers without cells, and each warehouse's
    cells once under ``kw_warehouses.<name, dots as _>.cells``, a module of its own then."""
    from safetensors.torch import save_file

    import kwconvert.io as kio
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(".warehouse.cells")}
    for module in model.modules():
        if isinstance(module, kwconvert.Warehouse):
            state[f"kw_warehouses.{module.name.replace('.', '_')}.cells"] = module.cells.detach()
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "1"})
    meta = json.loads((directory / META_FILE).read_text())
    meta.update(format=1)
    meta["weights"].update(sha256=kio._sha256(directory / WEIGHTS_FILE), aliases={})
    (directory / META_FILE).write_text(json.dumps(meta))


def test_a_save_in_format_1_still_loads(saved, tmp_path):
    model, directory = saved
    directory = copy_save(directory, tmp_path / "format1")
    rewrite_as_format_1(model, directory)
    loaded = kwconvert.load(directory, model=torchvision.models.resnet18(weights=None, num_classes=10)).eval()
    assert loaded.layer1[0].conv1.warehouse is loaded.layer1[1].conv2.warehouse  # still one module
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_plan_for_another_model_is_refused(saved):
    with pytest.raises(SavedModelError, match="does not fit"):
        kwconvert.load(saved[1], model=torchvision.models.resnet34(weights=None, num_classes=10))


SAVE_FOREVER = """
import sys, torch, torchvision, kwconvert
model = kwconvert.convert(torchvision.models.resnet50(weights=None), 1.0, init="random")
print("ready", flush=True)
while True:
    kwconvert.save(model, sys.argv[1], source="torchvision:resnet50")
"""


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.3, 1.1, 2.3])
def test_save_killed_half_way_leaves_the_previous_save_loadable(tmp_path, delay):
    directory = tmp_path / "saved"
    kwconvert.save(kwconvert.convert(torchvision.models.resnet18(weights=None), 1.0), directory,
                   source="torchvision:resnet18")
    process = subprocess.Popen([sys.executable, "-c", SAVE_FOREVER, str(directory)], stdout=subprocess.PIPE)
    assert process.stdout.readline().strip() == b"ready"
    time.sleep(delay)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    loaded = kwconvert.load(directory)  # the previous save or the new one, whole either way
    assert read_metadata(directory)["source"] in ("torchvision:resnet18", "torchvision:resnet50")
    assert kwconvert.plan_of(loaded).converted_layers
    # The next save sweeps what the killed one left half-written.
    kwconvert.save(loaded, directory)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    model = converted_resnet18()
    import kwconvert.io as kio

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", explode)
    with pytest.raises(OSError, match="disk full"):
        kwconvert.save(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    assert kio.FORMAT_VERSION == 2


def test_a_loaded_model_is_still_held_at_every_temperature(tmp_path):
    """The held attention (zero weight, logits in the bias) is state like any other."""
    model = converted_resnet18(1.0).eval()
    kwconvert.save(model, tmp_path / "m")
    loaded = kwconvert.load(tmp_path / "m", model=torchvision.models.resnet18(weights=None, num_classes=10)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        kwconvert.set_temperature(loaded, 0.0)
        assert (loaded(x) - expected).abs().max() <= 1e-4 * expected.abs().max()
