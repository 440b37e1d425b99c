"""Model sources and checkpoints: names resolve, bad ones say what to do, nothing unpickles."""
import pickle
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from kwconvert.models import (CheckpointError, ModelSourceError, build_model, canonical_source,
                              check_input_size, default_input_size, load_weights, parse_input_size,
                              read_state_dict)

from .helpers import CodePayload


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))


def not_a_module():
    return 42


def raising_factory():
    raise RuntimeError("boom")


def test_torchvision_name_builds_with_random_weights():
    model = build_model("resnet18")
    assert type(model).__name__ == "ResNet"
    assert canonical_source("resnet18") == "torchvision:resnet18"


@pytest.mark.parametrize("name,size", [("r3d_18", (3, 16, 112, 112)), ("mvit_v2_s", (3, 16, 224, 224)),
                                       ("inception_v3", (3, 299, 299)), ("resnet18", (3, 224, 224))])
def test_default_input_size_is_what_the_model_takes(name, size):
    """Video models take clips at their weights' crop size; the default must run as it is."""
    model = build_model(name).eval()
    assert default_input_size(model) == size
    if name == "r3d_18":
        with torch.no_grad():
            assert model(torch.randn(1, *size)).shape == (1, 400)


@pytest.mark.parametrize("name", ["googlenet", "inception_v3"])
def test_models_build_without_torchvision_warnings(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_model(name)


def test_an_input_size_of_the_wrong_rank_names_what_the_model_takes():
    check_input_size(build_model("resnet18"), (3, 64, 64))
    with pytest.raises(ValueError, match=r"has 2 numbers, but the model starts with a Conv2d, which takes C,H,W"):
        check_input_size(build_model("resnet18"), (64, 64))
    with pytest.raises(ValueError, match=r"Conv3d, which takes C,T,H,W \(e.g. 3,64,64,64\)"):
        check_input_size(build_model("r3d_18"), (3, 112, 112))


def test_a_package_in_the_current_directory_builds_without_pythonpath(tmp_path, monkeypatch):
    """As a console script runs: the directory it runs in is not on the import path."""
    (tmp_path / "kwc_local_models").mkdir()
    (tmp_path / "kwc_local_models" / "__init__.py").write_text("")
    (tmp_path / "kwc_local_models" / "nets.py").write_text(
        "from torch import nn\n\ndef build():\n    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if entry not in ("", str(tmp_path))])
    model = build_model("kwc_local_models.nets:build")
    assert isinstance(model[0], nn.Conv2d)
    assert sys.path[-1] == str(tmp_path)
    for name in ("kwc_local_models.nets", "kwc_local_models"):
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ModelSourceError, match="cannot import 'kwc_absent_models.nets'"):
        build_model("kwc_absent_models.nets:build")


def test_unknown_torchvision_name_suggests_close_names():
    with pytest.raises(ModelSourceError, match="did you mean resnet50"):
        build_model("resnet05")


def test_unknown_timm_name_is_a_clear_error():
    with pytest.raises(ModelSourceError, match="unknown timm model 'resnett18'.*resnet18"):
        build_model("timm:resnett18")


def test_timm_model_builds_offline():
    model = build_model("timm:resnet10t")
    assert default_input_size(model) == (3, 176, 176) or default_input_size(model)[0] == 3


def test_callable_source_builds_and_errors_are_named():
    assert isinstance(build_model("tests.test_models:tiny_model"), nn.Sequential)
    with pytest.raises(ModelSourceError, match="cannot import 'no_such_pkg"):
        build_model("no_such_pkg.mod:make")
    with pytest.raises(ModelSourceError, match="has no callable 'missing'"):
        build_model("tests.test_models:missing")
    with pytest.raises(ModelSourceError, match="returned int, not a torch.nn.Module"):
        build_model("tests.test_models:not_a_module")
    with pytest.raises(ModelSourceError, match="raised RuntimeError: boom"):
        build_model("tests.test_models:raising_factory")


@pytest.mark.parametrize("text,size", [("3,224,224", (3, 224, 224)), ("1x28x28", (1, 28, 28))])
def test_parse_input_size(text, size):
    assert parse_input_size(text) == size


@pytest.mark.parametrize("text", ["", "a,b", "3,0,224", "-3,2,2"])
def test_parse_input_size_rejects(text):
    with pytest.raises(ValueError, match="positive integers"):
        parse_input_size(text)


def test_weights_round_trip_safetensors_and_pt(tmp_path: Path):
    source = tiny_model()
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    torch.save({"state_dict": source.state_dict()}, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        target = tiny_model()
        load_weights(target, tmp_path / name)
        for key, value in source.state_dict().items():
            assert torch.equal(target.state_dict()[key], value)


def test_mismatched_weights_name_the_first_keys(tmp_path: Path):
    torch.save({"0.weight": torch.zeros(8, 3, 3, 3)}, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="missing 0.bias, 2.weight, 2.bias"):
        load_weights(tiny_model(), tmp_path / "w.pt")
    torch.save({**tiny_model().state_dict(), "0.weight": torch.zeros(8, 3, 5, 5)}, tmp_path / "s.pt")
    with pytest.raises(CheckpointError, match=r"shape of 0.weight is \(8, 3, 5, 5\)"):
        load_weights(tiny_model(), tmp_path / "s.pt")


def test_pickle_with_code_payload_is_refused_and_never_runs(tmp_path: Path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as handle:
        pickle.dump({"weight": CodePayload(str(marker))}, handle)
    with pytest.raises(CheckpointError, match="never unpickles"):
        read_state_dict(tmp_path / "evil.pt")
    assert not marker.exists()


def test_missing_and_truncated_checkpoints(tmp_path: Path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "nope.safetensors")
    save_file(tiny_model().state_dict(), tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read"):
        read_state_dict(tmp_path / "cut.safetensors")
