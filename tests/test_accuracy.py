"""The accuracy benchmark in miniature: IDX loader, recipe, every variant, the preserve check.

Needs Fashion-MNIST from Debian's package (``make data``); without it the tests that
read it are skipped with that message.  The full benchmark is ``benchmarks/accuracy.py``.
"""
import gzip
import json
import struct

import pytest
import torch

from benchmarks import accuracy
from benchmarks import fashion_mnist as fm

MISSING = fm.missing_files()
needs_data = pytest.mark.skipif(bool(MISSING), reason=(
    f"Fashion-MNIST is not installed ({MISSING[0] if MISSING else ''} is missing): run `make data` "
    "(apt-get install dataset-fashion-mnist)"))


def write_idx(path, type_code: int, shape: tuple[int, ...], payload: bytes) -> None:
    header = bytes([0, 0, type_code, len(shape)]) + struct.pack(f">{len(shape)}i", *shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + payload)


def test_idx_reader_decodes_big_endian_types_and_refuses_damage(tmp_path):
    values = [-2, 1, 70000, 3, 0, -1]
    write_idx(tmp_path / "ints.gz", 0x0C, (2, 3), struct.pack(">6i", *values))
    assert fm.read_idx(tmp_path / "ints.gz").tolist() == [values[:3], values[3:]]
    write_idx(tmp_path / "floats.gz", 0x0D, (2,), struct.pack(">2f", 0.5, -3.25))
    assert fm.read_idx(tmp_path / "floats.gz").tolist() == [0.5, -3.25]
    write_idx(tmp_path / "short.gz", 0x08, (4, 4), bytes(10))
    with pytest.raises(ValueError, match="damaged"):
        fm.read_idx(tmp_path / "short.gz")
    (tmp_path / "text").write_bytes(b"not idx at all")
    with pytest.raises(ValueError, match="not an IDX file"):
        fm.read_idx(tmp_path / "text")


def test_missing_data_is_named_with_the_way_to_install_it(tmp_path):
    with pytest.raises(fm.DataMissing, match="make data"):
        fm.load_split("train", tmp_path)


@needs_data
def test_the_installed_dataset_loads_whole_and_balanced():
    images, labels = fm.load_split("test")
    assert images.shape == (10000, 1, 28, 28) and images.dtype == torch.float32
    assert torch.bincount(labels).tolist() == [1000] * 10
    assert abs(float(images.mean())) < 0.05 and abs(float(images.std()) - 1) < 0.05
    subset = fm.balanced_subset(labels, 305)
    assert len(subset) == 305 and torch.bincount(labels[subset]).tolist() == [31] * 5 + [30] * 5


@pytest.mark.slow  # two minutes of training; the mobile net's tiny run below keeps accuracy.main in `make test`
@needs_data
def test_a_tiny_run_of_every_variant_writes_the_table(tmp_path, capsys):
    out = tmp_path / "accuracy.json"
    code = accuracy.main(["--train-images", "320", "--test-images", "400", "--seeds", "1", "--jobs", "1",
                          "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert [s["variant"] for s in result["summary"]] == accuracy.NET_VARIANTS["residual"]
    by_name = {s["variant"]: s for s in result["summary"]}
    assert by_name["KW 1/2x"]["params"] < by_name["baseline"]["params"] < by_name["KW 4x"]["params"]
    assert all(r["steps"] == round(accuracy.RECIPE.epochs * 320 / accuracy.RECIPE.batch_size)
               for r in result["runs"])
    assert by_name["baseline"]["accuracy_mean"] > 20  # a few dozen steps already beat chance (10 %)
    preserve = result["preserve_check"]
    assert preserve["predictions_changed"] == 0 and preserve["accuracy"] == preserve["baseline_accuracy"]
    assert "KW 1x" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["accuracy.json"]  # the temporary file was renamed


def test_the_temperature_follows_the_papers_schedule(monkeypatch):
    """tau falls linearly from 1 to 0 over the first fraction of the steps, then stays 0."""
    seen = []
    monkeypatch.setattr(fm.kwconvert, "set_temperature", lambda model, tau: seen.append(tau) or 0)
    recipe = fm.Recipe(train_images=64, batch_size=8, temperature_fraction=0.25)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 10))
    fm.train(model, torch.randn(64, 1, 2, 2), torch.randint(0, 10, (64,)), recipe, seed=0)
    assert seen[:3] == [1.0, 0.5, 0.0] and set(seen[2:]) == {0.0} and len(seen) == 9  # 8 steps + the end


def test_the_benchmark_trains_every_variant_with_one_recipe_and_the_papers_temperature():
    """Command-line defaults are RECIPE, tau anneals over the paper's first 10 % of training."""
    args = accuracy.parse_args([])
    assert (args.batch_size, args.lr, args.epochs) == (accuracy.RECIPE.batch_size, accuracy.RECIPE.lr,
                                                       accuracy.RECIPE.epochs)
    assert args.temperature_fraction == accuracy.RECIPE.temperature_fraction == 0.1


# =======================================================================================
# The MobileNetV2-like net (``--net mobile``)
# =======================================================================================
def test_the_mobile_net_is_depthwise_separable_and_small():
    torch.manual_seed(0)
    net = fm.MobileCNN().eval()
    assert 100_000 <= fm.parameter_count(net) <= 250_000
    assert net(torch.zeros(2, *fm.INPUT_SIZE)).shape == (2, fm.CLASSES)
    depthwise = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1]
    assert len(depthwise) == len(net.blocks) == sum(fm.net_config("mobile")["blocks"])
    assert [block.residual for block in net.blocks] == [True, False, True, False, True, False]


def test_the_allocator_takes_the_mobile_net_under_0_8_at_half():
    """The point of the mobile benchmarks: without the allocator b = 1/2 barely shrinks this net."""
    torch.manual_seed(0)
    net = fm.MobileCNN()
    ratios = fm.plan_ratios(net)
    assert ratios["ratio"] < 0.8 < 0.9 < ratios["ratio_without_allocator"] < 1.0
    assert ratios["notes"] and all(note.startswith("allocator:") for note in ratios["notes"])
    # A warehouse for the 2,570-parameter classifier would hold more than it saves: it stays plain.
    assert ratios["plain"]["fc"] == "head"
    converted = fm.kernelwarehouse(net, 0.5, inplace=False)
    assert fm.parameter_count(converted) == round(ratios["ratio"] * fm.parameter_count(net))
    assert type(converted.fc) is torch.nn.Linear
    assert converted.eval()(torch.zeros(2, *fm.INPUT_SIZE)).shape == (2, fm.CLASSES)


def test_the_net_flag_selects_the_mobile_net_its_variants_and_its_results_file():
    residual, mobile = accuracy.parse_args([]), accuracy.parse_args(["--net", "mobile"])
    assert residual.net == "residual" and residual.variants == accuracy.NET_VARIANTS["residual"]
    assert residual.out == accuracy.RESULTS["residual"] and residual.out.name == "accuracy.json"
    assert accuracy.net_options(residual) == {"widths": (32, 64, 128), "blocks_per_stage": 1}
    assert mobile.variants == accuracy.NET_VARIANTS["mobile"] == ["baseline", "KW 1/2x", "KW 1/2x, no allocator"]
    assert mobile.out.name == "accuracy_mobile.json" and accuracy.net_options(mobile) == {}
    assert isinstance(accuracy.build("KW 1/2x", 0, mobile.net, {}).blocks[0], fm.InvertedResidual)
    with pytest.raises(SystemExit):
        accuracy.parse_args(["--net", "mobile", "--widths", "8,16,32"])


@needs_data
def test_a_tiny_run_of_the_mobile_net_records_the_plan_with_and_without_the_allocator(tmp_path):
    out = tmp_path / "accuracy_mobile.json"
    code = accuracy.main(["--net", "mobile", "--train-images", "64", "--test-images", "100", "--seeds", "1",
                          "--jobs", "1", "--no-preserve-check", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["model"]["class"] == "MobileCNN" and result["model"]["widths"] == [16, 32, 64, 128]
    assert [s["variant"] for s in result["summary"]] == accuracy.NET_VARIANTS["mobile"]
    params = {s["variant"]: s["params"] for s in result["summary"]}
    plan = result["plan_at_half"]
    assert params["KW 1/2x"] == round(plan["ratio"] * params["baseline"])
    assert params["KW 1/2x, no allocator"] == round(plan["ratio_without_allocator"] * params["baseline"])
    assert plan["ratio"] < 0.8 < plan["ratio_without_allocator"]
