"""The plan's HTML page (kwconvert.report): content checked here, pixels in a real browser (slow)."""
import re
import shutil
import subprocess

import pytest
import torch
import torchvision
from typer.testing import CliRunner

import kwconvert
from kwconvert.pipeline import Conversion
from kwconvert.report import SWEEP_BUDGETS
from kwconvert_cli.main import app

from .helpers import one_line

CARD = re.compile(r'<div class="layer" data-warehouse="([^"]*)" style="background:([^"]+)">'
                  r'<div class="name">([^<]*)</div><div class="detail">([^<]*)</div>')


@pytest.fixture(scope="module")
def resnet18_page(tmp_path_factory):
    job = Conversion("resnet18", 0.5, input_size=(3, 64, 64))
    job.build(), job.make_plan()
    path = job.report(tmp_path_factory.mktemp("report") / "plan.html")
    return job, path.read_text(encoding="utf-8")


def test_every_layer_appears_once_in_execution_order_coloured_by_its_warehouse(resnet18_page):
    job, page = resnet18_page
    cards = CARD.findall(page)
    assert [name for _, _, name, _ in cards] == [c.name for c in job.graph.candidates]  # the order they run in
    warehouse_of = {layer: w.name for w in job.plan.warehouses for layer in w.layer_names}
    reason_of = {s.layer: s.reason for s in job.plan.plain}
    colours = {}
    for warehouse, background, name, detail in cards:
        if name in warehouse_of:
            assert warehouse == warehouse_of[name]
            assert colours.setdefault(warehouse, background) == background  # one colour per warehouse
        else:
            assert warehouse == "" and detail == f"static: {reason_of[name]}"
    assert len(set(colours.values())) == len(job.plan.warehouses)  # and a different one for each
    first = job.plan.warehouses[0].layers[1]
    assert f"m {first.cells}, cells {first.offset}..{first.offset + first.cells - 1} of" in page


def test_the_chart_shows_the_parameters_at_every_budget_of_the_sweep(resnet18_page):
    job, page = resnet18_page
    points = {float(b): float(r) for b, r in re.findall(r'data-budget="([\d.]+)" data-ratio="([\d.]+)"', page)}
    assert sorted(points) == sorted(SWEEP_BUDGETS)
    for budget, ratio in points.items():
        expected = kwconvert.plan(torchvision.models.resnet18(weights=None), budget, (torch.randn(1, 3, 64, 64),)).ratio
        assert ratio == pytest.approx(expected, abs=1e-4)
    assert points[0.25] < points[0.5] < points[1.0] < points[2.0] < points[4.0]


def test_the_page_stands_alone_and_holds_the_tables(resnet18_page):
    job, page = resnet18_page
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert not re.search(r"<script|<link|<img|src=|url\(", page)  # nothing fetched from anywhere
    assert re.findall(r"https?://[^\"]+", page) == ["http://www.w3.org/2000/svg"]  # the SVG namespace only
    for w in job.plan.warehouses:
        assert f">{w.m_t}</td>" in page and f">{w.warehouse_params:,}</td>" in page
    assert f"{job.plan.params_baseline:,} parameters before" in page


def test_the_command_line_writes_the_report_on_a_dry_run(tmp_path):
    path = tmp_path / "plan.html"
    result = CliRunner().invoke(app, ["convert", "resnet18", "--budget", "1/2", "--input-size", "3,32,32",
                                      "--dry-run", "--report", str(path)])
    assert result.exit_code == 0, result.output
    assert result.stdout.rstrip().endswith(f"report: {path}")
    assert len(CARD.findall(path.read_text())) == 21
    assert [p.name for p in tmp_path.iterdir()] == ["plan.html"]  # no temporary left beside it
    missing = CliRunner().invoke(app, ["convert", "resnet18", "--dry-run", "--report", str(tmp_path / "no" / "x.html")])
    assert missing.exit_code == 2 and "--report:" in one_line(missing.stderr)


@pytest.mark.slow
def test_the_page_renders_in_headless_chromium(resnet18_page, tmp_path):
    """A screenshot of the page in Debian's chromium (``make browser`` installs it) shows the
    warehouses' colours, not a blank or broken page."""
    browser = shutil.which("chromium")
    if browser is None:
        pytest.skip("chromium is not installed: make browser")
    page = tmp_path / "plan.html"
    page.write_text(resnet18_page[1], encoding="utf-8")
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1600",
                    f"--screenshot={shot}", page.as_uri()], check=True, capture_output=True, timeout=120)
    image = torchvision.io.decode_image(str(shot), mode=torchvision.io.ImageReadMode.RGB).float()
    assert image.shape[1:] == (1600, 1200)
    colourful = (image.amax(0) - image.amin(0)) > 40  # saturated pixels: the warehouse colours
    assert colourful.float().mean() > 0.05
    assert (image.mean(0) < 100).float().mean() > 0.002  # and dark ones: text
