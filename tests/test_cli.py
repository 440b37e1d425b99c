"""The command line, through typer's CliRunner and as the installed console script."""
import json
import os
import pickle
import re
import subprocess
import time

import pytest
import torch
import torchvision
from typer.testing import CliRunner

import kwconvert
from kwconvert_cli.main import app

from .helpers import CodePayload, installed_script, one_line
from .test_bad_input import small_cnn

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


def test_json_of_a_conversion_names_the_save_and_the_output_check(tmp_path):
    out = tmp_path / "small"
    result = invoke("convert", "tests.test_bad_input:small_cnn", "--input-size", "3,16,16", "--out", str(out),
                    "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["warehouses"] and data["conversion"]["saved_to"] == str(out) and (out / "kwconvert.json").is_file()
    assert set(data["conversion"]["max_abs_diff"]) == {"1", "0"}
    assert all(diff <= 1e-5 * data["conversion"]["output_scale"] for diff in data["conversion"]["max_abs_diff"].values())


def test_a_conversion_that_should_be_exact_and_is_not_exits_1_and_saves_nothing(tmp_path, monkeypatch):
    from kwconvert.pipeline import Conversion
    converted = Conversion.convert

    def broken(job):
        model = converted(job)
        with torch.no_grad():
            for name, cells in model.named_parameters():
                if name.endswith(".cells"):
                    cells.mul_(1.001)
        return model

    monkeypatch.setattr(Conversion, "convert", broken)
    result = invoke("convert", "tests.test_bad_input:small_cnn", "--input-size", "3,16,16", "--out",
                    str(tmp_path / "small"))
    assert result.exit_code == 1
    assert re.search(r"^error: layer \S+ differs from its original by .* at tau = 1, where the conversion should "
                     r"be exact \(<= 1e-05\); nothing was saved$", one_line(result.stderr))
    assert list(tmp_path.iterdir()) == []


def test_progress_in_a_log_is_plain_lines_for_long_steps_only():
    import io
    import time

    from rich.console import Console

    from kwconvert_cli import render
    log = io.StringIO()
    with render._LogProgress(Console(file=log, force_terminal=False, width=200), every=0.1) as progress:
        progress.step("quick step")
        progress.step("slow step")
        time.sleep(0.35)
        progress.step("last step")
    lines = log.getvalue().splitlines()
    assert lines and all(re.fullmatch(r"kwconvert \[ +\d+ s\] slow step: (\d+ s so far|done in \d+ s)", line)
                         for line in lines), lines
    assert lines[-1].endswith("done in 0 s") and "quick step" not in log.getvalue()


def test_quiet_prints_nothing_and_a_log_hears_of_long_steps(tmp_path, monkeypatch):
    from kwconvert_cli import render
    args = ("convert", "tests.test_bad_input:small_cnn", "--input-size", "3,16,16")
    quiet = invoke(*args, "--out", str(tmp_path / "a"), "--quiet")
    assert quiet.exit_code == 0 and quiet.stdout == "" and quiet.stderr == ""
    assert (tmp_path / "a" / "kwconvert.json").is_file()
    monkeypatch.setattr(render, "LOG_AFTER_SECONDS", 0.01)
    from kwconvert.pipeline import Conversion
    plan_quickly = Conversion.make_plan

    def plan_slowly(job):  # a step surely longer than LOG_AFTER_SECONDS: on an idle machine each may take less
        time.sleep(0.1)
        return plan_quickly(job)

    monkeypatch.setattr(Conversion, "make_plan", plan_slowly)
    logged = invoke(*args, "--out", str(tmp_path / "b"))
    assert logged.exit_code == 0 and "saved to" in logged.stdout
    assert re.search(r"^kwconvert \[ +\d+ s\] \w[\w ,=.]+: (\d+ s so far|done in \d+ s)$", logged.stderr, flags=re.M)


def test_model_args_reach_the_constructor_and_the_save_rebuilds_the_same_model(tmp_path):
    out = tmp_path / "r18-10"
    result = invoke("convert", "resnet18", "-M", "num_classes=10", "--model-arg", "zero_init_residual=true",
                    "--input-size", "3,32,32", "--out", str(out))
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "kwconvert.json").read_text())
    assert meta["model_args"] == {"num_classes": 10, "zero_init_residual": True}
    loaded = kwconvert.load(out)  # rebuilt from the source with the same arguments
    assert loaded.fc.out_features == 10


@pytest.mark.parametrize("arg,pattern", [
    ("num_clases=10", r"torchvision:resnet18 does not take the model arguments num_clases=10"),
    ("weights=DEFAULT", r"would fetch weights, which kwconvert never does: pass a checkpoint file with --weights"),
    ("ten", r"--model-arg: option 'ten' is not KEY=VALUE"),
])
def test_bad_model_args_are_one_line(arg, pattern, tmp_path):
    result = invoke("convert", "resnet18", "-M", arg, "--dry-run")
    assert result.exit_code == 2, result.output
    assert re.search(pattern, one_line(result.stderr))


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


@pytest.mark.parametrize("where,pattern", [
    ("file/sub", r"--out: cannot write .*file/sub: .*file is not a writable directory"),
    ("file", r"--out: .*file is a file, not a directory"),
    ("notes", r"--out: .*notes exists and is not a kwconvert save; choose another --out"),
    ("/proc/kwconvert-out", r"--out: cannot write /proc/kwconvert-out: /proc is not a writable directory"),
])
def test_an_out_it_cannot_write_is_refused_before_any_work(where, pattern, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a directory")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    monkeypatch.setattr("kwconvert.pipeline.Conversion.build", lambda job: pytest.fail("built a model first"))
    out = where if where.startswith("/") else str(tmp_path / where)
    result = invoke("convert", "resnet18", "--input-size", "3,32,32", "--out", out)
    assert result.exit_code == 2, result.output
    assert re.search(pattern, one_line(result.stderr))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "notes"]
    assert [p.name for p in (tmp_path / "notes").iterdir()] == ["todo.txt"]


def test_an_existing_save_is_replaced_only_with_force(tmp_path):
    out = tmp_path / "small"
    args = ("convert", "tests.test_bad_input:small_cnn", "--input-size", "3,16,16", "--out", str(out))
    assert invoke(*args).exit_code == 0
    first = (out / "model.safetensors").read_bytes()
    refused = invoke(*args, "--budget", "2")
    assert refused.exit_code == 2 and "holds a kwconvert save already; --force replaces it" in one_line(refused.stderr)
    assert (out / "model.safetensors").read_bytes() == first
    assert invoke(*args, "--budget", "2", "--force").exit_code == 0
    assert json.loads((out / "kwconvert.json").read_text())["budget"] == 2


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


def test_bench_times_a_save_and_a_model_against_their_originals(tmp_path):
    out = tmp_path / "small"
    assert invoke("convert", "tests.test_bad_input:small_cnn", "--input-size", "3,16,16", "--out", str(out),
                  "-q").exit_code == 0
    saved = invoke("bench", str(out), "--batch", "2", "--reps", "2", "--json")
    assert saved.exit_code == 0, saved.output
    data = json.loads(saved.stdout)
    assert data["input_size"] == [3, 16, 16] and data["batch"] == 2 and data["budget"] == 1
    assert [row["mode"] for row in data["rows"]] == ["inference", "training"]
    for row in data["rows"]:
        assert row["original_ms"] > 0 and row["converted_ms"] > 0 and row["repetitions"] == 2
        assert row["ratio_p25"] <= row["ratio"] <= row["ratio_p75"]
    fresh = invoke("bench", "tests.test_bad_input:small_cnn", "--input-size", "3,16,16", "--budget", "1/2",
                   "--mode", "inference", "--reps", "1", "--batch", "1", "--threads", "1")
    assert fresh.exit_code == 0, fresh.output
    text = " ".join(fresh.stdout.split())
    assert "at budget 0.5" in text and "inference" in text and "training" not in text
    assert "1 thread," in text and "medians of 1 repetition, interleaved in one process" in text


def test_bench_half_warehouses_reports_the_error_or_says_why_not(monkeypatch):
    from kwconvert.methods.kernelwarehouse import native, serving
    args = ("bench", "resnet18", "-M", "num_classes=10", "--input-size", "3,32,32", "--batch", "1", "--mode",
            "inference", "--reps", "1", "--half-warehouses")
    if native.mixes_half():
        data = json.loads(invoke(*args, "--json").stdout)
        assert 0 < data["half_warehouses_error"] <= serving.HALF_TOLERANCE
        assert "inference from float16 warehouses (outputs moved by" in " ".join(invoke(*args).stdout.split())
    monkeypatch.setattr(native, "mixes_half", lambda: False)
    result = invoke(*args)
    assert result.exit_code == 1
    assert re.fullmatch(r"error: RuntimeError: float16 warehouses need kwconvert's compiled AVX2 or AVX-512 kernel; "
                        r".*: the warehouses stay float32", one_line(result.stderr))


@pytest.mark.parametrize("args, pattern", [
    (("SAVE", "--budget", "2"), r"--budget applies to a MODEL; .* is a saved model, already converted"),
    (("resnet18", "--mode", "serving"), r"--mode must be inference or training, got 'serving'"),
    (("resnet18", "--budget", "x"), r"--budget"),
    (("resnet18", "--batch", "0"), r"--batch"),
])
def test_bench_bad_input_is_one_line(args, pattern, tmp_path):
    save = tmp_path / "m"
    kwconvert.save(kwconvert.convert(small_cnn(), 1.0), save)  # no source recorded
    result = invoke("bench", *[str(save) if arg == "SAVE" else arg for arg in args])
    assert result.exit_code == 2, result.output
    assert re.search(pattern, one_line(result.stderr))


def test_bench_of_a_save_without_source_needs_the_model(tmp_path):
    save = tmp_path / "m"
    kwconvert.save(kwconvert.convert(small_cnn(), 1.0), save)
    result = invoke("bench", str(save), "--reps", "1")
    assert result.exit_code == 2 and "records no model source: pass the unconverted model with --model MODEL" \
        in one_line(result.stderr)
    given = invoke("bench", str(save), "--model", "tests.test_bad_input:small_cnn", "--input-size", "3,16,16",
                   "--reps", "1", "--batch", "1", "--mode", "inference", "--json")
    assert given.exit_code == 0, given.output


def test_calibration_inputs_fit_the_cells_to_the_outputs(tmp_path):
    from safetensors.torch import save_file
    inputs = tmp_path / "inputs.safetensors"
    save_file({"inputs": torch.randn(40, 3, 16, 16)}, str(inputs))
    out = tmp_path / "small"
    result = invoke("convert", "tests.test_bad_input:small_cnn", "--budget", "1/2", "--input-size", "3,16,16",
                    "-O", "stem=warehouse", "--calibration", str(inputs), "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    fitted = [w for w in json.loads(result.stdout)["warehouses"] if w["budget"] < 1]
    assert fitted and all(0 <= w["output_error"] < 1 for w in fitted)
    shown = invoke("show", str(out))
    assert "output fit error (calibration)" in shown.stdout
    plain = invoke("convert", "tests.test_bad_input:small_cnn", "--budget", "1/2", "--input-size", "3,16,16",
                   "-O", "stem=warehouse", "--dry-run", "--json")
    assert all(w["output_error"] is None for w in json.loads(plain.stdout)["warehouses"])


@pytest.mark.parametrize("make, extra, code, pattern", [
    (None, (), 2, r"--calibration: .*missing.pt does not exist"),
    ("floats", ("--init", "random"), 2, r"--calibration fits the cells to the model's outputs: it needs --init preserve"),
    ("ints", (), 1, r"must hold one floating-point tensor of inputs"),
    ("pickle", (), 1, r"holds objects that are not plain tensors"),
])
def test_bad_calibration_files_are_one_line(make, extra, code, pattern, tmp_path):
    path = tmp_path / "missing.pt"
    if make == "floats":
        torch.save(torch.randn(4, 3, 16, 16), path)
    elif make == "ints":
        torch.save(torch.zeros(4, 3, 16, 16, dtype=torch.long), path)
    elif make == "pickle":
        path.write_bytes(pickle.dumps(CodePayload(str(tmp_path / "ran"))))
    result = invoke("convert", "tests.test_bad_input:small_cnn", "--budget", "1/2", "--input-size", "3,16,16",
                    "--calibration", str(path), "--out", str(tmp_path / "out"), *extra)
    assert result.exit_code == code, result.output
    assert re.search(pattern, one_line(result.stderr))
    assert not (tmp_path / "out").exists() and not (tmp_path / "ran").exists()


def test_odconv_converts_saves_loads_and_exports_through_the_cli(tmp_path):
    out = tmp_path / "od"
    result = invoke("convert", "resnet18", "--method", "odconv", "--kernels", "2", "--input-size", "3,32,32",
                    "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["method"] == "odconv" and len(data["layers"]) == 16 and data["warehouses"] == []
    assert {f"{t:g}" for t in (1, 30)} == set(data["conversion"]["max_abs_diff"])
    assert max(data["conversion"]["max_abs_diff"].values()) <= 1e-4 * data["conversion"]["output_scale"]
    model = kwconvert.load(out)
    assert type(model.layer1[0].conv1).__name__ == "ODConv2d" and model.layer1[0].conv1.kernels == 2
    assert sum(p.numel() for p in model.parameters()) == data["params"]["converted"]
    shown = invoke("show", str(out))
    words = " ".join(shown.stdout.split())  # the title wraps at the terminal's width
    assert shown.exit_code == 0 and "with odconv, 2 kernels per layer" in words
    assert "T = 1: as served" in words


@pytest.mark.parametrize("args, message", [
    (("--method", "odconv", "--budget", "2"), "--budget is KernelWarehouse's; ODConv takes --kernels N"),
    (("--kernels", "2"), "--kernels is ODConv's (add --method odconv)"),
    (("--method", "odc"), "--method must be one of kernelwarehouse, dynamic_conv, odconv, kerneldna, got 'odc'"),
    (("--method", "odconv", "-O", "kernel=3"), "unknown ODConv option 'kernel'"),
])
def test_bad_method_options_are_one_line(args, message):
    result = invoke("convert", "resnet18", "--dry-run", *args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("fit_parent", ["true", "false"])
def test_kerneldna_reports_the_parents_fit_error_in_the_summary_json_and_show(fit_parent, tmp_path):
    out = tmp_path / "dna"
    args = ("convert", "tests.test_kerneldna:dna_family", "--method", "kerneldna", "--input-size", "3,8,8",
            "-O", f"fit_parent={fit_parent}", "--out", str(out))
    converted = invoke(*args, "--json")
    assert converted.exit_code == 0, converted.output
    data = json.loads(converted.stdout)
    assert data["options"]["fit_parent"] is (fit_parent == "true")
    (parent,) = [entry for entry in data["plain"] if entry["reason"].startswith("KernelDNA parent")]
    assert (parent["fit_error"] > 0.1) if fit_parent == "true" else parent["fit_error"] == 0.0
    summary, shown = invoke(*args, "--force"), invoke("show", str(out))
    assert summary.exit_code == 0 and shown.exit_code == 0, summary.output + shown.output
    summary, shown = (" ".join(result.stdout.replace("│", " ").split()) for result in (summary, shown))
    for words in (summary, shown):
        assert f"parent kernel fit error (KernelDNA) {parent['fit_error']:.3f} .. {parent['fit_error']:.3f}" in words
    assert ("joint least-squares fit" in summary) is (fit_parent == "true")
    assert f"{parent['layer']} KernelDNA parent of 3 in pre {parent['fit_error']:.3f}" in shown   # the plain table
    bad = invoke("convert", "tests.test_kerneldna:dna_family", "--method", "kerneldna", "--input-size", "3,8,8",
                 "-O", "fit_parent=maybe", "--dry-run")
    assert bad.exit_code == 2 and "KernelDNA option fit_parent must be true or false, got 'maybe'" in bad.output


def test_kerneldna_dry_run_lists_children_and_parents_and_bench_takes_a_method():
    planned = invoke("convert", "resnet18", "--method", "kerneldna", "-O", "parent=first", "--input-size", "3,32,32",
                     "--dry-run", "--json")
    assert planned.exit_code == 0, planned.output
    data = json.loads(planned.stdout)
    assert data["method"] == "kerneldna" and {layer["parent"] for layer in data["layers"]} >= {"layer1.0.conv1"}
    assert invoke("convert", "resnet18", "--method", "kerneldna", "--budget", "2", "--dry-run").exit_code == 2
    timed = invoke("bench", "tests.test_bad_input:small_cnn", "--input-size", "3,16,16", "--method", "odconv",
                   "--kernels", "2", "--mode", "inference", "--reps", "1", "--batch", "2", "--json")
    assert timed.exit_code == 0, timed.output
    assert json.loads(timed.stdout)["method"] == "odconv"
