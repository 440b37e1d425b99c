"""What a wheel or sdist holds: every package of the library and the compiled kernel's sources.

An editable install (``make install``) finds every folder on disk, so a package missing from
``pyproject.toml`` goes unnoticed until someone installs a wheel and ``import kwconvert``
fails on ``kwconvert.methods``."""
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
