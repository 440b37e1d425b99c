"""The README's Python examples run as written."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_opens_with_the_two_setup_commands():
    commands = re.findall(r"^make [a-z-]+", README.read_text(), flags=re.M)
    assert commands[:2] == ["make demo", "make test"]


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {"__name__": "__readme__"})


def test_readme_json_schema_names_every_field_the_plan_writes():
    import torch
    import torchvision

    import kwconvert
    schema = re.search(r"print this schema.*?```\n(.*?)```", README.read_text(), flags=re.S).group(1)
    documented = set(re.findall(r'"(\w+)":', schema))
    data = kwconvert.plan(torchvision.models.resnet18(weights=None), 0.5, (torch.randn(1, 3, 32, 32),)).to_dict()
    warehouse = data["warehouses"][0]
    written = set(data) | set(warehouse) | set(warehouse["layer_details"][0]) | set(warehouse["params"]) \
        | set(warehouse["attention"]) | set(data["params"]) | set(data["plain"][0]) | set(data["cost"]) \
        | set(warehouse["cost"])
    assert written - documented == set()


def test_readme_documents_every_plan_option():
    from dataclasses import fields

    from kwconvert.methods.kerneldna.planning import KernelDNAOptions
    from kwconvert.methods.odconv.planning import ODConvOptions
    from kwconvert.methods.kernelwarehouse.options import PlanOptions
    text = README.read_text()
    for name in PlanOptions.help():
        assert f"`{name}`" in text, name
    methods = text[text.index("## Other methods"):text.index("## Plan options")]
    for options in (ODConvOptions, KernelDNAOptions):
        for field in fields(options):
            assert f"`{field.name}`" in methods, (options.__name__, field.name)
