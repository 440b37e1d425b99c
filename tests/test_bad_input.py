"""Bad-input corpus: every way a user can hand kwconvert something wrong, through the CLI.

For each case: the exit code (2 for usage errors, 1 for failures), exactly one line on
stderr, no traceback, and nothing written: the working directory, the inputs and any
directory the case names are byte for byte what they were (hidden files included).
Every case runs through typer's CliRunner; a selection also through the installed
``kwconvert`` script in a subprocess, where stderr is the real one (warnings from torch,
rich's progress display and fx would land there).

Covered elsewhere with the same checks, so not repeated here:

- ``test_cli.py::test_bad_input_is_one_line_and_an_exit_code``: an unknown torchvision
  name (with suggestions), the budgets ``abc 0 -1 nan inf 1/0``, a malformed
  ``--input-size``, an input size resnet18 rejects, ``--init zeros``; the same file: weights
  that do not match the model, a missing weights file, a pickle with a code payload, an
  ``--out`` that cannot be written, ``show`` of a directory that is not a save.
- ``test_io.py::test_save_killed_half_way_leaves_the_previous_save_loadable`` (slow): a save
  killed with SIGKILL half-way, in a subprocess, leaves the previous save loadable.
- ``test_io.py``: truncated, missing and tampered files and a plan for another model,
  through ``kwconvert.load``.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

import kwconvert
from kwconvert.io import META_FILE, WEIGHTS_FILE, SavedModelError
from kwconvert_cli.main import app

from .helpers import CodePayload, installed_script, one_line

ROOT = Path(__file__).resolve().parents[1]
SMALL = "tests.test_bad_input:small_cnn"
SMALL_INPUT = "3,16,16"


# --- model sources the cases name -------------------------------------------------------------
class SmallCNN(nn.Module):
    """Three convs and a classifier; at b = 1 a stem warehouse and one shared by two convs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3)  # no padding: inputs under 3x3 are rejected
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv3(F.relu(self.conv2(F.relu(self.conv1(x))))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def small_cnn() -> nn.Module:
    return SmallCNN()


def no_candidate_layers() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.ReLU())


def only_a_stem() -> nn.Module:
    """A ViT's shape for ODConv: its one convolution is the stem, which the authors keep static."""
    return nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def factory_that_raises() -> nn.Module:
    raise RuntimeError("boom")


def factory_returning_a_dict():
    return {"model": small_cnn()}


# --- inputs the cases point at (each made under a directory ``where``) -----------------------
def saved_small_cnn(where: Path) -> Path:
    torch.manual_seed(0)
    model = kwconvert.convert(small_cnn(), 1.0, example_inputs=(torch.zeros(1, 3, 16, 16),))
    return kwconvert.save(model, where / "saved", source=SMALL, input_size=(3, 16, 16))


def edited_save(where: Path, edit: Callable[[dict], None]) -> Path:
    """A save whose kwconvert.json was edited by hand."""
    save = saved_small_cnn(where)
    meta = json.loads((save / META_FILE).read_text())
    edit(meta)
    (save / META_FILE).write_text(json.dumps(meta))
    return save


def cut_in_half(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def cut_safetensors(where: Path) -> Path:
    save_file(small_cnn().state_dict(), where / "weights.safetensors")
    return cut_in_half(where / "weights.safetensors")


def text_named_pt(where: Path) -> Path:
    (where / "weights.pt").write_text("this is not a checkpoint\n" * 100)
    return where / "weights.pt"


def pickle_with_code(where: Path) -> Path:
    with open(where / "weights.pth", "wb") as handle:
        pickle.dump({"conv1.weight": CodePayload(str(where / "payload-ran"))}, handle)
    return where / "weights.pth"


def a_directory(where: Path) -> Path:
    (where / "weights").mkdir()
    return where / "weights"


def someone_elses_directory(where: Path) -> Path:
    (where / "results").mkdir()
    (where / "results" / "notes.txt").write_text("the user's own file")
    return where / "results"


def save_with_newer_format(where: Path) -> Path:
    return edited_save(where, lambda meta: meta.update(format=meta["format"] + 1))


def save_with_wrong_m(where: Path) -> Path:
    """The first layer of the shared warehouse claims m = 10 cells; its kernel holds 9."""
    return edited_save(where, lambda meta: meta["plan"]["warehouses"][1]["m"].__setitem__(0, 10))


def save_with_wrong_n(where: Path) -> Path:
    """The shared warehouse claims n = 28 cells; b = 1 x m_t = 27 gives 27."""
    return edited_save(where, lambda meta: meta["plan"]["warehouses"][1].update(n=28))


def save_with_wrong_m_t(where: Path) -> Path:
    """The shared warehouse claims m_t = 28; its layers' m are 9 and 18."""
    return edited_save(where, lambda meta: meta["plan"]["warehouses"][1].update(m_t=28))


def save_with_wrong_offset(where: Path) -> Path:
    """conv3 claims to start on cell 0; conv2's 9 cells come first in the one-to-one walk."""
    return edited_save(where, lambda meta: meta["plan"]["warehouses"][1]["layer_details"][1].update(offset=0))


def save_with_cell_not_dividing(where: Path) -> Path:
    """A cell of 48 output channels tiles neither conv2's nor conv3's 64."""
    return edited_save(where, lambda meta: meta["plan"]["warehouses"][1].update(cell=[48, 32, 1, 1]))


def save_with_plan_field_missing(where: Path) -> Path:
    return edited_save(where, lambda meta: meta["plan"]["warehouses"][1].pop("n"))


def save_with_plan_field_of_wrong_type(where: Path) -> Path:
    return edited_save(where, lambda meta: meta["plan"]["warehouses"][1].update(m="9,18"))


def save_with_weights_cut_short(where: Path) -> Path:
    save = saved_small_cnn(where)
    cut_in_half(save / WEIGHTS_FILE)
    return save


def save_with_broken_json(where: Path) -> Path:
    save = saved_small_cnn(where)
    (save / META_FILE).write_text('{"format": 1, "plan": ')
    return save


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]          # "{input}" stands for the path ``needs`` returns
    code: int
    pattern: str                   # searched in the one stderr line
    needs: Callable[[Path], Path] | None = None  # makes the input


CASES: dict[str, Case] = {
    # Model sources.
    "module-not-importable": Case(("no_such_pkg.models:build",), 2, r"cannot import 'no_such_pkg\.models'"),
    "callable-missing": Case(("tests.test_bad_input:missing_factory",), 2, r"has no callable 'missing_factory'"),
    "callable-raises": Case(("tests.test_bad_input:factory_that_raises",), 2, r"raised RuntimeError: boom"),
    "callable-returns-no-module": Case(("tests.test_bad_input:factory_returning_a_dict",), 2,
                                       r"returned dict, not a torch\.nn\.Module"),
    "unknown-timm-model": Case(("timm:no_such_net",), 2, r"unknown timm model 'no_such_net'"),
    # What the model accepts and holds.
    "input-smaller-than-kernel": Case((SMALL, "--input-size", "3,2,2"), 1,
                                      r"model rejected an example input of size 1x3x2x2"),
    "input-of-wrong-rank": Case((SMALL, "--input-size", "3,16"), 2,
                                r"--input-size: input size 3,16 has 2 numbers, but the model starts with a Conv2d"),
    "no-convertible-layer": Case(("tests.test_bad_input:no_candidate_layers",), 1,
                                 r"no Conv1d/Conv2d/Conv3d/Linear layer to convert"),
    "every-layer-excluded": Case((SMALL, "--input-size", SMALL_INPUT, "--exclude", "*"), 1,
                                 r"the plan converts no layer: all 4 candidate layers stay plain"),
    "only-a-static-stem": Case(("tests.test_bad_input:only_a_stem", "--method", "odconv", "--input-size", "3,32,32"), 1,
                               r"converts no layer: .*\(0: stem \(static in the authors' nets\), .*\(-O stem=convert "
                               r"converts what the authors keep static\)$"),
    "include-matching-nothing": Case((SMALL, "--input-size", SMALL_INPUT, "--include", "nomatch*"), 2,
                                     r"include pattern 'nomatch\*' matches no layer of the model \(its layers: "),
    # Options.
    "budget-1e400": Case((SMALL, "--budget", "1e400"), 2, r"--budget: .*positive finite"),
    "budget-empty": Case((SMALL, "--budget", ""), 2, r"--budget: .*positive finite"),
    "budget-beyond-memory": Case((SMALL, "--input-size", SMALL_INPUT, "--budget", "1e9"), 1,
                                 r"the plan at b=1e\+09 needs [\d.]+ GiB .* choose a smaller budget$"),
    "max-blocks-0": Case((SMALL, "--max-blocks-per-stage", "0"), 2, r"--max-blocks-per-stage"),
    "max-blocks-not-a-number": Case((SMALL, "--max-blocks-per-stage", "two"), 2, r"--max-blocks-per-stage"),
    "plan-option-unknown": Case((SMALL, "-O", "no_such=1"), 2, r"unknown plan option\(s\) no_such"),
    "plan-option-bad-value": Case((SMALL, "-O", "stem=bogus"), 2, r"option stem must be one of"),
    "plan-option-not-key-value": Case((SMALL, "-O", "stem"), 2, r"is not KEY=VALUE"),
    "module-not-in-model": Case((SMALL, "--module", "nope", "--input-size", SMALL_INPUT), 2,
                                r"has no sub-module 'nope'$"),
    "module-misspelled": Case((SMALL, "--module", "conv4", "--input-size", SMALL_INPUT), 2,
                              r"has no sub-module 'conv4'; did you mean conv\d, conv\d, conv\d\?$"),
    "unknown-option": Case((SMALL, "--frobnicate"), 2, r"No such option: --frobnicate"),
    "option-without-value": Case((SMALL, "--budget"), 2, r"'--budget' requires an argument"),
    "no-model": Case(("--budget", "1"), 2, r"Missing argument 'model'"),
    # Checkpoints given with --weights.
    "weights-safetensors-cut-short": Case((SMALL, "--weights", "{input}"), 1, r"cannot read .* as safetensors",
                                          cut_safetensors),
    "weights-not-a-checkpoint": Case((SMALL, "--weights", "{input}"), 1, r"not a file written by torch\.save",
                                     text_named_pt),
    "weights-pickle-with-code": Case((SMALL, "--weights", "{input}"), 1, r"never unpickles code", pickle_with_code),
    "weights-is-a-directory": Case((SMALL, "--weights", "{input}"), 1, r"is not a file", a_directory),
    # Where to write.
    "out-is-someone-elses-directory": Case((SMALL, "--input-size", SMALL_INPUT, "--out", "{input}"), 2,
                                           r"--out: .* exists and is not a kwconvert save", someone_elses_directory),
    # Saved directories.
    "show-nothing-there": Case(("show", "nowhere"), 1, r"nowhere does not exist"),
    "show-newer-format": Case(("show", "{input}"), 1, r"has format \d+, newer than this kwconvert reads",
                              save_with_newer_format),
    "show-weights-cut-short": Case(("show", "{input}"), 1, r"does not match the checksum", save_with_weights_cut_short),
    "show-metadata-not-json": Case(("show", "{input}"), 1, r"is not valid JSON", save_with_broken_json),
    "show-plan-with-wrong-m": Case(("show", "{input}"), 1, r"plan warehouse pre\.conv2d, layer conv2: m is 10 "
                                   r"but cell 64x32x1x1 tiles the kernel in 9", save_with_wrong_m),
    "show-plan-with-wrong-n": Case(("show", "{input}"), 1, r"plan warehouse pre\.conv2d: n is 28, "
                                   r"budget 1 x m_t 27 gives 27", save_with_wrong_n),
    "show-plan-with-wrong-m_t": Case(("show", "{input}"), 1, r"plan warehouse pre\.conv2d: m_t is 28, "
                                     r"its layers' m sum to 27", save_with_wrong_m_t),
    "show-plan-with-wrong-offset": Case(("show", "{input}"), 1, r"plan warehouse pre\.conv2d, layer conv3: "
                                        r"offset is 0, the one-to-one walk gives 9", save_with_wrong_offset),
    "show-plan-with-cell-not-dividing": Case(("show", "{input}"), 1, r"plan warehouse pre\.conv2d, layer conv2: "
                                             r"cell 48x32x1x1 does not divide kernel 64x32x3x3",
                                             save_with_cell_not_dividing),
    "show-plan-with-field-missing": Case(("show", "{input}"), 1, r"plan JSON: warehouse pre\.conv2d: 'n' is missing$",
                                         save_with_plan_field_missing),
    "show-plan-with-field-of-wrong-type": Case(("show", "{input}"), 1, r"plan JSON: warehouse pre\.conv2d: 'm' must "
                                               r"be a list of integers, got a string '9,18'$",
                                               save_with_plan_field_of_wrong_type),
    "export-to-unknown-device": Case(("export", "{input}", "--device", "bogus"), 2,
                                     r"--device: device 'bogus' cannot be used here: Expected one of cpu, ",
                                     saved_small_cnn),
}
SUBPROCESS_CASES = ("module-not-importable", "unknown-option", "weights-pickle-with-code", "show-weights-cut-short",
                    "every-layer-excluded", "module-misspelled", "show-plan-with-wrong-m")
#: The budgets the trust issue lists; CliRunner runs them in test_cli.py, the real script here.
BAD_BUDGETS = ("0", "-1", "nan", "inf", "1/0", "abc")


def snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under ``root`` (hidden ones too), with a digest of each file."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def prepare(case: Case, tmp_path: Path) -> tuple[list[str], Path]:
    """The case's arguments with its input made, and an empty working directory."""
    inputs, cwd = tmp_path / "inputs", tmp_path / "cwd"
    inputs.mkdir()
    cwd.mkdir()
    made = case.needs(inputs) if case.needs else None
    return [a.replace("{input}", str(made)) for a in case.args], cwd


def check(case: Case, code: int, stderr: str, before: dict, tmp_path: Path) -> None:
    assert code == case.code, stderr
    line = one_line(stderr)
    assert stderr.splitlines() == [line], stderr  # not even a blank line around it
    assert line.startswith("error: "), line
    assert re.search(case.pattern, line), line
    assert snapshot(tmp_path) == before  # nothing written, nothing changed
    assert not list(tmp_path.rglob("payload-ran"))  # a pickle's code never ran


def run_cli(args: list[str], cwd: Path, monkeypatch) -> tuple[int, str]:
    monkeypatch.chdir(cwd)
    result = CliRunner().invoke(app, args if args[0] in ("show", "export") else ["convert", *args])
    return result.exit_code, result.stderr


def run_script(args: list[str], cwd: Path) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([installed_script(), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    return done.returncode, done.stderr


@pytest.mark.parametrize("name", CASES)
def test_bad_input_through_the_cli(name, tmp_path, monkeypatch):
    case = CASES[name]
    args, cwd = prepare(case, tmp_path)
    before = snapshot(tmp_path)
    code, stderr = run_cli(args, cwd, monkeypatch)
    check(case, code, stderr, before, tmp_path)


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_bad_input_through_the_installed_script(name, tmp_path):
    case = CASES[name]
    args, cwd = prepare(case, tmp_path)
    before = snapshot(tmp_path)
    check(case, *run_script(args, cwd), before, tmp_path)


@pytest.mark.parametrize("budget", BAD_BUDGETS)
def test_bad_budget_through_the_installed_script(budget, tmp_path):
    case = Case(("resnet18", "--budget", budget), 2, r"^error: --budget: budget must be a positive")
    args, cwd = prepare(case, tmp_path)
    before = snapshot(tmp_path)
    check(case, *run_script(args, cwd), before, tmp_path)


@pytest.mark.parametrize("edited", [save_with_wrong_m, save_with_wrong_n, save_with_plan_field_missing])
def test_edited_plan_is_refused_by_load(edited, tmp_path):
    save = edited(tmp_path)
    with pytest.raises(SavedModelError, match=r"plan does not fit the model: .*(m is 10|n is 28|'n' is missing)"):
        kwconvert.load(save)


def test_small_cnn_converts_when_nothing_is_excluded():
    """So "every-layer-excluded" fails because of --exclude, not because of the model."""
    plan = kwconvert.plan(small_cnn(), 1.0, (torch.zeros(1, 3, 16, 16),))
    assert [len(w.layers) for w in plan.warehouses] == [1, 2] and [s.layer for s in plan.plain] == ["fc"]
