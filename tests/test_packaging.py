"""What a wheel or sdist holds: every package of the library and the compiled kernel's sources;
and that it installs and runs where no compiler is.

An editable install (``make install``) finds every folder on disk, so a package missing from
``pyproject.toml`` goes unnoticed until someone installs a wheel and ``import kwconvert``
fails on ``kwconvert.methods``."""
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_library_package_is_listed_for_the_wheel():
    on_disk = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "kwconvert").rglob("__init__.py")}
    listed = set(SETUPTOOLS["packages"])
    assert on_disk <= listed, f"missing from pyproject.toml [tool.setuptools] packages: {sorted(on_disk - listed)}"
    assert "kwconvert_cli" in listed and SETUPTOOLS["package-dir"]["kwconvert_cli"] == "cli"


def test_the_kernels_sources_travel_with_their_package():
    for package, files in SETUPTOOLS["package-data"].items():
        folder = ROOT.joinpath(*package.split("."))
        for name in files:
            assert (folder / name).is_file(), f"package-data {package}: {name} is not in {folder}"


def test_pip_installs_without_a_compiler_and_the_pure_pytorch_paths_run(tmp_path):
    """A machine without a C compiler (``CC=false``: every compile fails) still installs kwconvert
    (each kernel copy is optional) and converts and trains a model on the pure-PyTorch paths.
    The sources are copied first, so the build never touches this checkout's ``build/``."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("kwconvert", "cli"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    target = tmp_path / "site"
    environment = {**os.environ, "CC": "false", "CXX": "false"}
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(target), str(source)], check=True, env=environment, capture_output=True)
    script = ("import torch, kwconvert\n"
              "from kwconvert.methods.kernelwarehouse import native\n"
              "assert kwconvert.__file__.startswith(%r), kwconvert.__file__\n"
              "assert native.built_isas() == () and not native.available()\n"
              "model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),\n"
              "                            torch.nn.Conv2d(16, 16, 3, padding=1))\n"
              "kw = kwconvert.convert(model, 1.0, example_inputs=torch.randn(2, 8, 6, 6))\n"
              "out = kw(torch.randn(4, 8, 6, 6))\n"
              "out.square().mean().backward()\n"
              "assert all(p.grad is not None for p in kw.parameters() if p.requires_grad)\n"
              "print('ran', tuple(out.shape))\n") % str(target)
    ran = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(target)},
                         capture_output=True, text=True, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert "ran (4, 16, 6, 6)" in ran.stdout
