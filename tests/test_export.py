"""Export: torch.export and ONNX with a dynamic batch, checked against eager; the CLI's export.

Small models keep the file fast; resnet18 and DeiT-Tiny are marked slow.
"""
from __future__ import annotations

import math
import re
import sys

import onnx
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

import kwconvert
from kwconvert.export import ExportError, MissingExportPackages, export_path
from kwconvert import execution
from kwconvert.methods.kernelwarehouse.layers import KWConv1d, KWConv2d, KWConv3d, Warehouse, is_kw_layer
from kwconvert_cli.main import app

from .helpers import input_dependent, one_line

TOLERANCE = 1e-4
# the module (``kwconvert.export`` itself is the function, as ``kwconvert.plan`` is)


# --- models -----------------------------------------------------------------------------------


class TinyCNN(nn.Module):
    """Dense, strided, grouped, dilated, depthwise and reflect-padded convolutions and a head."""

    def __init__(self, conv: type[nn.Module] = nn.Conv2d, padding_mode: str = "zeros") -> None:
        super().__init__()
        self.stem = conv(3, 16, 3, padding=1)
        self.down = conv(16, 32, 3, stride=2, padding=1, padding_mode=padding_mode)
        self.grouped = conv(32, 32, 3, padding=2, dilation=2, groups=4, bias=False)
        self.depthwise = conv(32, 32, 3, padding=1, groups=32)
        self.pointwise = conv(32, 32, 1)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.stem, self.down, self.grouped, self.depthwise, self.pointwise):
            x = F.relu(conv(x))
        return self.head(x.flatten(2).mean(-1))


class TokenMLP(nn.Module):
    """Linear layers on (B, L, C) tokens, like a ViT's MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(24, 48), nn.Linear(48, 48), nn.Linear(48, 24)
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(x)))))
        return self.head(x.mean(1))


def tiny_cnn() -> nn.Module:
    """A model source for saved directories (``tests.test_export:tiny_cnn``)."""
    return TinyCNN()


def converted(model: nn.Module, budget: float, input_size: tuple[int, ...], tau: float = 0.4) -> nn.Module:
    """``model`` converted with every candidate layer in a warehouse, at temperature ``tau``."""
    torch.manual_seed(0)
    model = kwconvert.convert(model.eval(), budget, example_inputs=torch.randn(1, *input_size),
                              stem="warehouse", max_params_ratio=100)
    input_dependent(model)
    kwconvert.set_temperature(model, tau)
    return model.eval()


def kw_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if is_kw_layer(m)]


def run_onnx(path, x: torch.Tensor) -> torch.Tensor:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def eager(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


# --- the export-friendly formulation -------------------------------------------------------------


@pytest.mark.parametrize("layer_type,spatial,options", [
    (KWConv1d, (11,), dict(kernel_size=3, stride=2, padding=1)),
    (KWConv1d, (10,), dict(kernel_size=4, padding="same", dilation=2, padding_mode="circular")),
    (KWConv2d, (9, 8), dict(kernel_size=3, padding=1, groups=4)),
    (KWConv2d, (9, 8), dict(kernel_size=(3, 1), stride=(2, 1), padding=(1, 0), padding_mode="reflect")),
    (KWConv2d, (7, 7), dict(kernel_size=3, dilation=2, padding=2, groups=8, bias=False)),
    (KWConv2d, (6, 6), dict(kernel_size=1)),
    (KWConv3d, (5, 6, 4), dict(kernel_size=3, stride=(1, 2, 1), padding=1, padding_mode="replicate")),
])
def test_export_path_computes_what_eager_computes(layer_type, spatial, options):
    torch.manual_seed(0)
    kernel = options["kernel_size"]
    positions = kernel ** len(spatial) if isinstance(kernel, int) else math.prod(kernel)
    groups = options.get("groups", 1)
    warehouse = Warehouse(n=2 * positions, cell=(8, 8 // groups, *(1,) * len(spatial)))  # b = 2
    layer = layer_type(8, 8, warehouse=warehouse, offset=0, budget=2.0, hidden=16, **options).eval()
    layer.tau = 0.3
    x = torch.randn(3, 8, *spatial)
    expected = eager(layer, x)
    with export_path(layer):
        assert execution.is_im2col()
        got = eager(layer, x)
    assert not execution.is_im2col()  # the switch is put back
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# --- torch.export -------------------------------------------------------------------------------


def test_torch_export_keeps_the_batch_dynamic_and_matches_eager(tmp_path):
    model = converted(TinyCNN(), 1.0, (3, 16, 16), tau=0.3)
    model.train()
    report = kwconvert.export(model, tmp_path / "tiny.pt2", format="torch_export")
    assert model.training and all(m.training for m in model.modules())  # flags restored
    assert report.temperature == pytest.approx(0.3)
    assert set(report.max_abs_diff) == {1, 4} and max(report.max_abs_diff.values()) <= TOLERANCE
    program = torch.export.load(tmp_path / "tiny.pt2")
    # the fast path as it is: the compiled kernel's operator where it is built, else one batched
    # product; no batch-folded convolution either way
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert not any("convolution" in target for target in targets)
    assert any(target.startswith("kwconvert.conv") for target in targets) == kwconvert.methods.kernelwarehouse.native.available()
    model.eval()
    for batch in (1, 3, 4):  # 3 was neither traced nor checked
        x = torch.randn(batch, 3, 16, 16)
        torch.testing.assert_close(program.module()(x), eager(model, x), rtol=0, atol=TOLERANCE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.pt2"]


def test_a_channels_last_plain_convolution_exports_without_torch_warning(tmp_path, recwarn):
    """The stem, left plain, holds a channels-last weight (rewrite.py); torch's archive warns about
    any such weight.  The export says nothing, and the reloaded program holds the same weight."""
    torch.manual_seed(0)
    model = kwconvert.convert(TinyCNN().eval(), 1.0, example_inputs=torch.randn(1, 3, 16, 16), stem="plain",
                              max_params_ratio=100)
    assert not is_kw_layer(model.stem) and model.stem.weight.is_contiguous(memory_format=torch.channels_last)
    assert not model.stem.weight.is_contiguous()
    kwconvert.export(model, tmp_path / "tiny.pt2", format="torch_export")
    assert not [w for w in recwarn if "complete tensor" in str(w.message)]
    program = torch.export.load(tmp_path / "tiny.pt2")
    assert torch.equal(program.state_dict["stem.weight"], model.stem.weight)


def test_a_model_never_converted_exports_plain_at_its_default_input_size(tmp_path):
    model = TinyCNN()
    report = kwconvert.export(model, tmp_path / "plain.pt2", format="torch_export")
    assert report.example_shape == (2, 3, 224, 224)
    assert report.temperature is None
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(torch.export.load(tmp_path / "plain.pt2").module()(x), eager(model, x))


# --- ONNX -----------------------------------------------------------------------------------------

CASES = {
    # name: (model, budget, one sample's input size)
    "conv2d-grouped-depthwise-reflect-b1/2": (lambda: TinyCNN(padding_mode="reflect"), 0.5, (3, 16, 16)),
    "conv1d-b4": (lambda: TinyCNN(nn.Conv1d), 4.0, (3, 24)),
    "conv3d-b1": (lambda: TinyCNN(nn.Conv3d), 1.0, (3, 6, 6, 6)),
    "linear-tokens-b2": (TokenMLP, 2.0, (7, 24)),
}


@pytest.mark.parametrize("name", CASES)
def test_onnx_with_a_dynamic_batch_runs_in_onnxruntime_like_eager(name, tmp_path):
    build, budget, input_size = CASES[name]
    model = converted(build(), budget, input_size)
    plan = kwconvert.plan_of(model)
    assert len(kw_layers(model)) >= 3
    if budget < 1:  # cells shared between mixtures: beta is a least-squares fit, not one-to-one
        assert any(w.init_error for w in plan.warehouses)
        betas = [m.attention.beta for m in kw_layers(model)]
        assert any(((b != 0) & (b != 1)).any() for b in betas)
    report = kwconvert.export(model, tmp_path / "model.onnx")  # example input from the plan
    assert report.example_shape == (2, *input_size) and report.opset == 18
    assert max(report.max_abs_diff.values()) <= TOLERANCE
    proto = onnx.load(tmp_path / "model.onnx")
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {18}
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "batch" and not batch_dim.dim_value  # symbolic, named, not a number
    assert all(out.type.tensor_type.shape.dim[0].dim_param == "batch" for out in proto.graph.output)
    assert "Conv" not in {node.op_type for node in proto.graph.node}
    for batch in (1, 4, 3):
        x = torch.randn(batch, *input_size)
        diff = (run_onnx(tmp_path / "model.onnx", x) - eager(model, x)).abs().max().item()
        assert diff <= TOLERANCE, (batch, diff)


def test_the_reference_path_cannot_give_onnx_a_dynamic_batch(tmp_path):
    """Why export_path exists (README "Export"): the batch-folded groups become a symbolic attribute."""
    model = converted(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)), 1.0, (3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    with kwconvert.reference_path(), pytest.raises(Exception) as raised:
        torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    assert "Unsupported attribute type" in str(raised.value) and "Conv" in str(raised.value)


def test_a_written_file_that_differs_from_eager_is_refused_and_nothing_is_left(tmp_path, monkeypatch):
    model = converted(TinyCNN(), 1.0, (3, 16, 16))
    right = kwconvert.methods.kernelwarehouse.layers._KWConvNd._im2col_conv
    monkeypatch.setattr(kwconvert.methods.kernelwarehouse.layers._KWConvNd,
                        "_im2col_conv", lambda layer, x, w: right(layer, x, w) * 1.01)
    with pytest.raises(ExportError, match=r"differs from eager by .* at batch 1, over the tolerance 0.0001"):
        kwconvert.export(model, tmp_path / "new" / "dir" / "model.onnx")
    assert list(tmp_path.iterdir()) == []  # no file, no temporary, no directory made for it


class DataDependent(nn.Module):
    """Control flow on a value: torch.export cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y if y.sum() > 0 else -y


def test_an_untraceable_model_is_one_error_without_pages_of_graph_on_stderr(tmp_path, capfd):
    model = converted(DataDependent(), 1.0, (3, 12, 12))
    with pytest.raises(ExportError, match="torch.export failed on an input of size 2x3x12x12"):
        kwconvert.export(model, tmp_path / "model.pt2", format="torch_export")
    assert len(capfd.readouterr().err.splitlines()) <= 2
    assert list(tmp_path.iterdir()) == []


def test_missing_onnx_packages_say_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    model = converted(TinyCNN(), 1.0, (3, 16, 16))
    missing = r"needs onnxruntime, not installed: install kwconvert\[export\]"
    with pytest.raises(MissingExportPackages, match=missing) as raised:
        kwconvert.export(model, tmp_path / "model.onnx")
    assert isinstance(raised.value, ImportError) and "\n" not in str(raised.value)
    with pytest.raises(ValueError, match="opset must be 18 or newer"):
        kwconvert.export(model, tmp_path / "model.onnx", opset=17)
    assert list(tmp_path.iterdir()) == []


# --- torch.compile -------------------------------------------------------------------------------


def compiled_model_matches_eager(backend: str) -> None:
    """The whole converted model (KWLinear, b < 1 fitted cells) in eval at a fixed temperature;
    tests/test_fast.py covers the layers in training and backward."""
    model = converted(TokenMLP(), 0.5, (7, 24), tau=0.2)
    compiled = torch.compile(model, backend=backend, fullgraph=True)  # fullgraph: a graph break raises
    for batch in (4, 1):
        x = torch.randn(batch, 7, 24)
        torch.testing.assert_close(eager(compiled, x), eager(model, x), rtol=1e-5, atol=TOLERANCE)


def test_torch_compile_of_a_converted_model_matches_eager():
    compiled_model_matches_eager("aot_eager")


@pytest.mark.slow
def test_torch_compile_with_inductor_of_a_converted_model_matches_eager():
    compiled_model_matches_eager("inductor")


# --- real models ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("source,input_size", [("resnet18", (3, 64, 64)),
                                               ("timm:deit_tiny_patch16_224", (3, 224, 224))])
def test_real_models_export_to_both_formats(source, input_size, tmp_path):
    from kwconvert.models import build_model
    torch.manual_seed(0)
    model = kwconvert.convert(build_model(source).eval(), 1.0, example_inputs=torch.randn(1, *input_size)).eval()
    input_dependent(model)
    kwconvert.set_temperature(model, 0.5)
    for name, format in (("model.pt2", "torch_export"), ("model.onnx", "onnx")):
        report = kwconvert.export(model, tmp_path / name, format=format)
        assert max(report.max_abs_diff.values()) <= TOLERANCE, (format, report.max_abs_diff)


# --- command line -------------------------------------------------------------------------------


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = kwconvert.convert(tiny_cnn(), 1.0, example_inputs=torch.randn(1, 3, 12, 12),
                              stem="warehouse", max_params_ratio=100)
    input_dependent(model)  # as if fine-tuned: tau = 0 computes something else than tau = 1
    return kwconvert.save(model, tmp_path_factory.mktemp("saves") / "tiny", source="tests.test_export:tiny_cnn")


def test_cli_exports_a_saved_directory_and_reports_the_check(saved):
    result = invoke("export", str(saved))
    assert result.exit_code == 0, result.output
    written = saved.with_name("tiny.onnx")
    assert result.stdout.startswith(f"wrote {written} (onnx, opset 18, dynamic batch, tau = 1)\n")
    assert written.is_file()
    diffs = re.findall(r"([0-9.e+-]+) at batch (\d)", result.stdout)
    assert [batch for _, batch in diffs] == ["1", "4"] and all(float(d) <= TOLERANCE for d, _ in diffs)
    x = torch.randn(3, 3, 12, 12)
    model = kwconvert.load(saved).eval()  # tau 1, as the CLI exported it
    assert (run_onnx(written, x) - eager(model, x)).abs().max() <= TOLERANCE


def test_cli_exports_torch_export_at_a_temperature(saved, tmp_path):
    out = tmp_path / "tiny-tau0.pt2"
    result = invoke("export", str(saved), "--format", "torch_export", "--temperature", "0", "--batch", "1",
                    "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "tau = 0" in result.stdout
    model = kwconvert.load(saved).eval()
    x = torch.randn(2, 3, 12, 12)
    at_zero = torch.export.load(out).module()(x)
    assert (at_zero - eager(model, x)).abs().max() > 1e-3  # not the tau = 1 function ...
    kwconvert.set_temperature(model, 0.0)
    torch.testing.assert_close(at_zero, eager(model, x), rtol=0, atol=TOLERANCE)  # ... but tau = 0's


@pytest.mark.parametrize("args,code,pattern", [
    (("{missing}",), 1, r"does not exist"),
    (("{saved}", "--format", "tflite"), 2, r"--format must be one of onnx, torch_export, got 'tflite'"),
    (("{saved}", "--opset", "17"), 2, r"--opset must be 18 or newer"),
    (("{saved}", "--temperature", "1.5"), 2, r"--temperature must lie in \[0, 1\]"),
    (("{saved}", "--batch", "0"), 2, r"--batch"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(args, code, pattern, saved, tmp_path):
    out = tmp_path / "out.onnx"
    args = [a.format(missing=tmp_path / "nowhere", saved=saved) for a in args]
    before = sorted(saved.parent.iterdir())
    result = invoke("export", *args, "--out", str(out))
    assert result.exit_code == code, result.output
    line = one_line(result.stderr)
    assert line.startswith("error: ") and re.search(pattern, line), line
    assert list(tmp_path.iterdir()) == [] and sorted(saved.parent.iterdir()) == before


def test_cli_exports_a_save_without_a_source_given_the_model(tmp_path):
    model = kwconvert.convert(tiny_cnn(), 1.0, example_inputs=torch.randn(1, 3, 12, 12), stem="warehouse",
                              max_params_ratio=100)
    kwconvert.save(model, tmp_path / "nameless")  # an API conversion: no source recorded
    refused = invoke("export", str(tmp_path / "nameless"), "--format", "torch_export")
    assert refused.exit_code == 1 and "--model MODEL" in one_line(refused.stderr)
    done = invoke("export", str(tmp_path / "nameless"), "--format", "torch_export", "--model", "tests.test_export:tiny_cnn")
    assert done.exit_code == 0, done.output
    assert (tmp_path / "nameless.pt2").is_file()


def test_cli_export_without_onnx_packages_is_one_line_before_loading(saved, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    monkeypatch.setattr(kwconvert.io, "load", lambda *a, **k: pytest.fail("loaded a model it cannot export"))
    result = invoke("export", str(saved), "--out", str(tmp_path / "x.onnx"))
    assert result.exit_code == 1
    assert "install kwconvert[export]" in one_line(result.stderr)
    assert list(tmp_path.iterdir()) == []


class Twins(nn.Module):
    """A stem and three 3x3 convolutions of one shape: a KernelDNA family, three ODConv layers."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Sequential(*(nn.Conv2d(16, 16, 3, padding=1) for _ in range(3)))
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        for conv in self.body:
            x = F.relu(conv(x))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("method,options", [("odconv", {"kernels": 4}), ("odconv", {"kernels": 1}),
                                            ("kerneldna", {})])
@pytest.mark.parametrize("format", ["onnx", "torch_export"])
def test_other_methods_export_with_a_dynamic_batch_like_eager(method, options, format, tmp_path):
    torch.manual_seed(0)
    model = kwconvert.convert(Twins().eval(), method=method, example_inputs=torch.randn(1, 3, 12, 12), **options)
    dynamic = [m for m in model.modules() if type(m).__name__.startswith(("ODConv", "KDNAConv"))]
    assert len(dynamic) == (3 if method == "odconv" else 2)
    with torch.no_grad():  # input-dependent heads and gates, so that the export has something to follow
        for layer in dynamic:
            heads = layer.attention.heads if method == "odconv" else (layer.gate.excite,)
            for head in heads:
                head.weight.normal_(0, 0.5)
    path = tmp_path / ("model.onnx" if format == "onnx" else "model.pt2")
    report = kwconvert.export(model.eval(), path, format, torch.randn(2, 3, 12, 12))
    assert max(report.max_abs_diff.values()) <= TOLERANCE
    if format == "onnx":
        for batch in (1, 3):
            x = torch.randn(batch, 3, 12, 12)
            assert (run_onnx(path, x) - eager(model, x)).abs().max().item() <= TOLERANCE
