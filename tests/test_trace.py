"""The tracer: candidates in execution order with their shapes, the residual structure,
and the hook fallback where fx cannot trace."""
import importlib

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from kwconvert.trace import LayerGraph, layer_kind, trace


@pytest.fixture(scope="module")
def resnet18_graph() -> LayerGraph:
    return trace(torchvision.models.resnet18(weights=None))


def test_resnet18_candidates_are_recorded_in_execution_order_with_shapes(resnet18_graph):
    names = [c.name for c in resnet18_graph.candidates]
    assert names[:6] == ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2",
                         "layer2.0.conv1"]
    # the shortcut projection runs after the block's main path in torchvision's forward
    assert names.index("layer2.0.downsample.0") == names.index("layer2.0.conv2") + 1
    assert names[-1] == "fc" and len(names) == 21
    assert [c.order for c in resnet18_graph.candidates] == list(range(21))

    stem = resnet18_graph.candidate("conv1")
    assert (stem.kind, stem.weight_shape, stem.in_channels, stem.groups) == ("conv2d", (64, 3, 7, 7), 3, 1)
    assert (stem.input_shape, stem.output_shape) == ((1, 3, 224, 224), (1, 64, 112, 112))
    strided = resnet18_graph.candidate("layer2.0.conv1")
    assert (strided.weight_shape, strided.input_shape, strided.output_shape) == (
        (128, 64, 3, 3), (1, 64, 56, 56), (1, 128, 28, 28))
    fc = resnet18_graph.candidate("fc")
    assert (fc.kind, fc.weight_shape, fc.input_shape) == ("linear", (1000, 512), (1, 512))
    assert resnet18_graph.params_baseline == 11_689_512
    assert resnet18_graph.norm_types == frozenset({"batchnorm"})
    assert resnet18_graph.traced_with == "fx" and not resnet18_graph.notes


def test_without_the_fake_mode_shapes_come_from_real_tensors_and_agree(resnet18_graph, monkeypatch):
    """Fake tensors are a speed-up from a private torch module; without them the trace is the same."""
    monkeypatch.setattr(importlib.import_module("kwconvert.trace"), "FakeTensorMode", None)
    graph = trace(torchvision.models.resnet18(weights=None))
    assert graph.candidates == resnet18_graph.candidates and graph.traced_with == "fx"
    assert dict(graph.dataflow.nodes(data="shape")) == dict(resnet18_graph.dataflow.nodes(data="shape"))


def test_resnet18_residual_blocks_span_fork_to_add(resnet18_graph):
    blocks = resnet18_graph.residual_blocks
    assert len(blocks) == 8
    assert blocks[0].members == ("layer1.0.conv1", "layer1.0.conv2")
    assert blocks[2].members == ("layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0")
    assert blocks[2].shape == (1, 128, 28, 28)
    # layer2.0 forks off the output of layer1.1 (a relu after its add): the chain of adds
    assert resnet18_graph.source(blocks[2].fork) == blocks[1].add
    assert resnet18_graph.input_source("layer2.0.downsample.0") == blocks[1].add
    # the first block forks off the stem's max-pooled output
    assert resnet18_graph.source(blocks[0].fork) == resnet18_graph.node_of["conv1"]


def test_upstream_and_downstream_candidates_cross_adds_but_stop_at_layers(resnet18_graph):
    assert resnet18_graph.stems == ("conv1",)
    assert resnet18_graph.upstream_candidates("layer1.0.conv1") == ("conv1",)
    assert resnet18_graph.upstream_candidates("layer2.0.conv1") == ("conv1", "layer1.0.conv2", "layer1.1.conv2")
    assert resnet18_graph.downstream_candidates("layer4.1.conv2") == ("fc",)
    assert set(resnet18_graph.downstream_candidates("conv1")) == {
        "layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.downsample.0"}


class DataDependent(nn.Module):
    """``if`` on a tensor value: torch.fx cannot trace this."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        if x.abs().sum() > 0:
            x = x + self.body(x)
        x = self.down(x)
        return self.head(x.mean((2, 3)))


def test_untraceable_model_falls_back_to_hooks_with_a_note():
    graph = trace(DataDependent(), torch.randn(1, 3, 32, 32))
    assert graph.traced_with == "hooks" and not graph.exact
    assert [c.name for c in graph.candidates] == ["stem", "body", "down", "head"]
    assert graph.candidate("down").input_shape == (1, 8, 32, 32)
    assert graph.candidate("down").output_shape == (1, 16, 16, 16)
    assert graph.residual_blocks == ()
    assert len(graph.notes) == 1 and "fx could not trace" in graph.notes[0]
    assert "residual blocks" in graph.notes[0]  # says which grouping information was lost
    # "down" reads the 32x32 map (it makes the 16x16 one): it stays in the stage it reads
    assert graph.resolution_stages() == {"stem": 0, "body": 0, "down": 0, "head": 0}


def test_model_without_candidates_raises():
    with pytest.raises(ValueError, match="no Conv1d/Conv2d/Conv3d/Linear layer"):
        trace(nn.Sequential(nn.ReLU(), nn.Flatten()))


def test_rejected_input_size_raises_one_line_value_error():
    model = torchvision.models.vit_b_16(weights=None)  # asserts its 224 x 224 input size
    with pytest.raises(ValueError) as info:
        trace(model, torch.randn(1, 3, 64, 64))
    message = str(info.value)
    assert "rejected an example input of size 1x3x64x64" in message
    assert "Wrong image height" in message and "pass another" in message
    assert "\n" not in message


def test_rejected_input_of_an_untraceable_model_raises_too():
    with pytest.raises(ValueError, match="rejected an example input of size 1x1x32x32"):
        trace(DataDependent(), torch.randn(1, 1, 32, 32))


def test_training_flag_is_restored():
    model = DataDependent().train()
    trace(model, torch.randn(1, 3, 16, 16))
    assert model.training
    model.eval()
    trace(model, torch.randn(1, 3, 16, 16))
    assert not model.training


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.out = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.out(self.conv(self.conv(x)))


def test_module_called_twice_is_recorded_once_and_noted():
    graph = trace(Shared(), torch.randn(1, 4, 8, 8))
    assert [c.name for c in graph.candidates] == ["conv", "out"]
    assert graph.candidate("conv").calls == 2
    assert any("conv is called at 2 places" in note for note in graph.notes)


class OddLayers(nn.Module):
    """A Conv2d subclass with its own forward, a functional use of a Linear's weight, a
    Linear that only reads a parameter, and a layer never called."""

    class MyConv(nn.Conv2d):
        def forward(self, x):
            return F.conv2d(x, self.weight * 1.0, self.bias, self.stride, self.padding)

    def __init__(self):
        super().__init__()
        self.conv = self.MyConv(3, 8, 3, padding=1)
        self.functional = nn.Linear(8, 8)
        self.table = nn.Parameter(torch.randn(4, 8))
        self.on_constants = nn.Linear(8, 8)
        self.never = nn.Linear(8, 8)

    def forward(self, x):
        x = self.conv(x).mean((2, 3))
        bias = self.on_constants(self.table).mean(0)
        return F.linear(x, self.functional.weight) + bias


def test_subclasses_are_leaves_and_unused_layers_say_why():
    graph = trace(OddLayers(), torch.randn(1, 3, 8, 8))
    assert [c.name for c in graph.candidates] == ["conv"]
    assert layer_kind(OddLayers.MyConv(1, 1, 1)) == "conv2d"
    reasons = dict(graph.unused)
    assert "weight is used by a function" in reasons["functional"]
    assert "never the model input" in reasons["on_constants"]
    assert reasons["never"] == "not called on the example input"


def test_default_input_follows_the_models_own_size_and_tuples_are_accepted():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    model.pretrained_cfg = {"input_size": (3, 40, 40)}
    model(torch.randn(1, 3, 40, 40))  # materialise the lazy layer
    assert trace(model).input_shapes == ((1, 3, 40, 40),)
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    assert trace(model, (torch.randn(2, 3, 9, 9),)).candidates[0].output_shape == (2, 4, 7, 7)


def test_conv1d_conv3d_and_depthwise_flags():
    model = nn.Sequential(nn.Conv1d(4, 4, 3, groups=4), nn.Conv1d(4, 8, 1, groups=2))
    graph = trace(model, torch.randn(1, 4, 16))
    depthwise, grouped = graph.candidates
    assert (depthwise.kind, depthwise.depthwise, depthwise.grouped) == ("conv1d", True, False)
    assert (grouped.weight_shape, grouped.depthwise, grouped.grouped, grouped.pointwise) == (
        (8, 2, 1), False, True, True)
    graph = trace(nn.Sequential(nn.Conv3d(2, 4, 3)), torch.randn(1, 2, 5, 5, 5))
    assert graph.candidates[0].kind == "conv3d" and graph.candidates[0].input_spatial == (5, 5, 5)
    with pytest.raises(ValueError, match="wrap it in a container"):
        trace(nn.Conv3d(2, 4, 3), torch.randn(1, 2, 5, 5, 5))


def test_transformer_residual_stream_is_traced_through_reshapes():
    graph = trace(torchvision.models.swin_t(weights=None))
    assert len(graph.residual_blocks) == 24
    unused = dict(graph.unused)
    # torchvision's Swin calls F.linear with qkv/proj weights: they are not layers to swap
    assert "weight is used by a function" in unused["features.1.0.attn.qkv"]


# --- transformers and sub-modules -----------------------------------------------------------
def small_torchvision_vit(layers: int = 2) -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer
    return VisionTransformer(image_size=32, patch_size=8, num_layers=layers, num_heads=2, hidden_dim=32,
                             mlp_dim=64, num_classes=10)


def test_attention_adds_and_the_fused_qkv_layout_are_recorded():
    import timm
    graph = trace(timm.create_model("deit_tiny_patch16_224"))
    assert [block.attention for block in graph.residual_blocks] == [True, False] * 12
    assert graph.candidate("blocks.0.attn.qkv").out_layout == (1, 197, 3, 3, 64)
    assert graph.candidate("blocks.0.mlp.fc1").out_layout is None
    assert not any(block.attention for block in trace(torchvision.models.resnet18(weights=None)).residual_blocks)


def test_multihead_attention_is_traced_unpacked_and_put_back():
    model = small_torchvision_vit()
    graph = trace(model, torch.randn(1, 3, 32, 32))
    assert graph.exact and graph.unpacked_attention == (
        "encoder.layers.encoder_layer_0.self_attention", "encoder.layers.encoder_layer_1.self_attention")
    names = [c.name for c in graph.candidates]
    prefix = "encoder.layers.encoder_layer_0.self_attention"
    assert names[1:5] == [f"{prefix}.q_proj", f"{prefix}.k_proj", f"{prefix}.v_proj", f"{prefix}.out_proj"]
    assert graph.candidate(f"{prefix}.v_proj").input_shape == (1, 17, 32)  # batch first: pooled per sample
    assert [block.attention for block in graph.residual_blocks] == [True, False] * 2
    assert type(model.encoder.layers[0].self_attention) is nn.MultiheadAttention  # put back


class Normalising(nn.Module):
    """Hands its backbone a tensor it computes, as a detector's transform does."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(self.backbone((x - 0.5) * 2))


def test_module_inputs_are_what_the_submodule_receives():
    from kwconvert.trace import module_inputs
    x = torch.rand(1, 3, 10, 10)
    (recorded,) = module_inputs(Normalising(), "backbone", x)
    assert torch.equal(recorded, (x - 0.5) * 2)
    with pytest.raises(ValueError, match="no sub-module 'backbone.9'"):
        module_inputs(Normalising(), "backbone.9", x)


class ReadsWeight(nn.Module):
    """Reads a layer's weight for its dtype, as timm's gemma4 patch embedding does."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.proj = nn.Linear(8, 4)

    def forward(self, x):
        x = self.conv(x).mean((2, 3))
        return self.proj(x.to(self.proj.weight.dtype))


class Branching(nn.Module):
    """fx cannot trace data-dependent control flow: only the hook fallback works."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x) if x.sum() > -1e9 else self.model(-x)


def test_weight_read_outside_the_forward_is_seen_by_fx_and_by_the_hook_fallback():
    x = torch.randn(1, 3, 8, 8)
    graph = trace(ReadsWeight(), x)
    assert graph.candidate("proj").weight_read and not graph.candidate("conv").weight_read
    model = Branching(ReadsWeight())
    graph = trace(model, x)
    assert graph.traced_with == "hooks"
    assert graph.candidate("model.proj").weight_read and not graph.candidate("model.conv").weight_read
    assert type(model.model.proj) is nn.Linear  # the watching class is gone


def test_subclasses_with_their_own_forward_are_named():
    class Doubled(nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    graph = trace(nn.Sequential(nn.Conv2d(3, 4, 3), Doubled(4, 4, 3)), torch.randn(1, 3, 9, 9))
    assert graph.candidates[0].custom_forward is None
    assert graph.candidates[1].custom_forward.endswith("Doubled")
