"""The command line, through typer's CliRunner and as the installed console script."""
import json
import os
import pickle
import re
import subprocess

import pytest
import torch
import torchvision
from typer.testing import CliRunner

import kwconvert
from kwconvert_cli.main import app

from .helpers import CodePayload, installed_script, one_line

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_dry_run_prints_the_warehouse_tables():
    result = invoke("convert", "resnet18", "--budget", "1/2", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "layer1.0.conv1" in result.stdout
    for m_t in ("224", "188", "108"):
        assert m_t in result.stdout


def test_json_is_the_documented_schema_and_only_output():
    result = invoke("convert", "resnet18", "--budget", "1", "--dry-run", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert {"model", "budget", "params", "warehouses", "plain"} <= set(data)
    assert set(data["params"]) == {"baseline", "converted"}
    assert [w["m_t"] for w in data["warehouses"]] == [56, 47, 47, 27]
    assert [w["n"] for w in data["warehouses"]] == [56, 47, 47, 27]
    assert data["model"] == "torchvision:resnet18"
    for warehouse in data["warehouses"]:
        assert {"name", "layers", "cell", "m", "m_t", "n"} <= set(warehouse)
    assert all({"layer", "reason"} == set(p) for p in data["plain"])


def test_a_dry_run_on_the_meta_device_plans_what_the_cpu_plans():
    """The meta device plans a model too big for the machine's memory: no weight is allocated."""
    on_cpu = invoke("convert", "resnet18", "--budget", "1/2", "--dry-run", "--json")
    on_meta = invoke("convert", "resnet18", "--budget", "1/2", "--dry-run", "--json", "--device", "meta")
    assert on_meta.exit_code == 0, on_meta.output
    assert json.loads(on_meta.stdout) == json.loads(on_cpu.stdout)


@pytest.mark.parametrize("args,code,pattern", [
    (("resnet05", "--dry-run"), 2, r"unknown torchvision model 'resnet05'.*did you mean resnet50"),
    (("resnet18", "--budget", "abc", "--dry-run"), 2, r"--budget"),
    (("resnet18", "--budget", "0", "--dry-run"), 2, r"--budget"),
    (("resnet18", "--budget", "-1", "--dry-run"), 2, r"--budget"),
    (("resnet18", "--budget", "nan", "--dry-run"), 2, r"--budget"),
    (("resnet18", "--budget", "inf", "--dry-run"), 2, r"--budget"),
    (("resnet18", "--budget", "1/0", "--dry-run"), 2, r"--budget"),
    (("resnet18", "--input-size", "3,x", "--dry-run"), 2, r"--input-size"),
    (("resnet18", "--input-size", "1,64,64", "--dry-run"), 1, r"input"),
    (("resnet18", "--init", "zeros"), 2, r"--init must be preserve or random"),
    (("resnet18", "--input-size", "64,64", "--dry-run"), 2,
     r"--input-size: input size 64,64 has 2 numbers, but the model starts with a Conv2d, which takes C,H,W"),
    (("resnet18", "--device", "meta"), 2, r"--device meta holds no weights.*--dry-run"),
    (("resnet18", "--device", "gpu9", "--dry-run"), 2, r"--device: device 'gpu9' cannot be used here"),
])
def test_bad_input_is_one_line_and_an_exit_code(args, code, pattern, tmp_path):
    os.chdir(tmp_path)
    result = invoke("convert", *args)
    assert result.exit_code == code, result.output
    assert re.search(pattern, one_line(result.stderr))
    assert list(tmp_path.iterdir()) == []


def test_any_plan_option_through_dash_o():
    result = invoke("convert", "convnext_tiny", "-O", "max_blocks_per_stage=3", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["warehouses"]) == 16
    result = invoke("convert", "resnet18", "-O", "exclude=layer4.*,fc", "--dry-run", "--json")
    plain = {p["layer"]: p["reason"] for p in json.loads(result.stdout)["plain"]}
    assert plain["layer4.1.conv2"] == "excluded by option"
    bad = invoke("convert", "resnet18", "-O", "bogus=1", "--dry-run")
    assert bad.exit_code == 2 and "unknown plan option(s) bogus" in one_line(bad.stderr)


def test_convert_saves_and_show_prints_it(tmp_path):
    out = tmp_path / "out"
    result = invoke("convert", "resnet18", "--budget", "1", "--out", str(out), "--input-size", "3,64,64")
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file() and (out / "kwconvert.json").is_file()
    assert "kwconvert.load(" in result.stdout
    for tau in ("1", "0"):  # where fine-tuning starts and where the model is served
        diff = float(re.search(rf"max \|output diff\| at tau = {tau}\s+│?\s*([0-9.e+-]+)", result.stdout).group(1))
        assert diff <= 1e-4
    assert "the original's at every temperature" in result.stdout
    shown = invoke("show", str(out))
    assert shown.exit_code == 0 and "layer4.1.conv2" in shown.stdout
    shown_json = invoke("show", str(out), "--json")
    assert json.loads(shown_json.stdout)["warehouses"][0]["m_t"] == 56


def test_show_tells_the_temperatures_and_the_fit_error_of_a_save(tmp_path):
    model = kwconvert.convert(torchvision.models.resnet18(weights=None), 0.5)
    kwconvert.set_temperature(model, 0.0)  # as trained past the warm-up
    kwconvert.save(model, tmp_path / "m", source="torchvision:resnet18")
    shown = invoke("show", str(tmp_path / "m"))
    assert shown.exit_code == 0, shown.output
    text = " ".join(shown.stdout.split())
    assert "tau = 0: as served (all 19 layers)" in text
    errors = [w.init_error for w in kwconvert.plan_of(model).warehouses if w.init_error]
    assert f"{min(errors):.3f} .. {max(errors):.3f} relative" in text
    assert "torchvision:resnet18" in text and f"torch {torch.__version__}" in text


def test_weights_that_do_not_match_name_the_keys(tmp_path):
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pt")
    result = invoke("convert", "resnet18", "--weights", str(tmp_path / "r34.pt"), "--out", str(tmp_path / "o"))
    assert result.exit_code == 1
    assert "unexpected layer1.2.conv1.weight" in one_line(result.stderr)
    assert not (tmp_path / "o").exists()


def test_missing_weights_file(tmp_path):
    result = invoke("convert", "resnet18", "--weights", str(tmp_path / "nope.pt"), "--dry-run")
    assert result.exit_code == 1
    assert "does not exist" in one_line(result.stderr)


def test_pickle_with_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pth", "wb") as handle:
        pickle.dump({"conv1.weight": CodePayload(str(marker))}, handle)
    result = invoke("convert", "resnet18", "--weights", str(tmp_path / "evil.pth"), "--dry-run")
    assert result.exit_code == 1
    assert "never unpickles" in one_line(result.stderr)
    assert not marker.exists()


def test_unwritable_out_is_one_line_and_leaves_nothing(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = invoke("convert", "resnet18", "--input-size", "3,32,32", "--out", str(blocker / "sub"))
    assert result.exit_code == 1
    one_line(result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_show_of_a_damaged_directory(tmp_path):
    result = invoke("show", str(tmp_path))
    assert result.exit_code == 1
    assert "kwconvert.json" in one_line(result.stderr)


def test_debug_shows_the_traceback():
    result = invoke("convert", "resnet05", "--dry-run", "--debug")
    assert result.exit_code != 0
    assert result.exception is not None


def test_installed_script_runs_as_a_subprocess(tmp_path):
    result = subprocess.run([installed_script(), "resnet18", "--budget", "1/4", "--dry-run", "--json"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert [w["n"] for w in json.loads(result.stdout)["warehouses"]] == [56, 47, 47, 27]
    bad = subprocess.run([installed_script(), "resnet05"], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300)
    assert bad.returncode == 2
    assert "did you mean" in one_line(bad.stderr)


@pytest.mark.parametrize("args, code", [([], 2), (["-h"], 0), (["--help"], 0), (["resnet18", "-h"], 0)],
                         ids=["bare", "-h", "--help", "convert -h"])
def test_help_prints_for_bare_and_short_flags(args, code):
    """Run bare, kwconvert used to exit 2 and print nothing; -h was 'No such option'."""
    done = subprocess.run([installed_script(), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == code, done.stderr
    assert done.stdout.startswith("Usage: kwconvert") and not done.stderr


def test_version_prints_the_installed_version():
    from importlib.metadata import version
    done = subprocess.run([installed_script(), "--version"], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout.strip()) == (0, f"kwconvert {version('kwconvert')}")
