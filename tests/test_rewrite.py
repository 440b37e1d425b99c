"""The rewriter: layers swapped in place, the model's own class and forward kept, and the
trained weights preserved (exactly for b >= 1 at tau = 1, by a least-squares fit for b < 1)."""
import copy
import dataclasses
import math

import pytest
import torch
import torchvision
from torch import nn

import kwconvert
from kwconvert import rewrite
from kwconvert.methods.kernelwarehouse.layers import KW_LAYER_TYPES, set_temperature
from kwconvert.rewrite import check_plan_fits


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorms non-trivial statistics, as a trained model has."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    return model


def outputs_match(name: str, budget: float, size: int = 224, trained_bn: bool = False,
                  **options) -> tuple[float, nn.Module, nn.Module]:
    """Max |original - converted| in eval mode; ``trained_bn`` gives the BNs real statistics."""
    torch.manual_seed(0)
    original = torchvision.models.get_model(name, weights=None).eval()
    if trained_bn:
        randomise_bn(original)
    converted = kwconvert.convert(original, budget, inplace=False, **options).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        diff = (original(x) - converted(x)).abs().max().item()
    return diff, original, converted


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_preserve_at_b1_reproduces_the_original(name):
    diff, original, converted = outputs_match(name, 1.0)
    assert diff <= 1e-4
    assert type(converted) is type(original)
    plan = kwconvert.plan_of(converted)
    assert n_params(converted) == plan.params_converted


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "convnext_tiny", "resnext50_32x4d", "efficientnet_b0",
                                  "mobilenet_v3_large", "regnet_y_400mf", "densenet121"])
def test_preserve_at_b1_reproduces_the_original_big(name):
    diff, _, converted = outputs_match(name, 1.0)
    assert diff <= 1e-4
    assert n_params(converted) == kwconvert.plan_of(converted).params_converted


def test_preserve_with_trained_statistics_is_exact_to_float_rounding():
    diff, original, _ = outputs_match("resnet18", 1.0, size=96, trained_bn=True)
    with torch.no_grad():
        scale = original(torch.randn(2, 3, 96, 96)).abs().max().item()
    assert diff <= 1e-6 * max(scale, 1.0) * 10


def test_preserve_at_b4_reproduces_the_original():
    diff, _, converted = outputs_match("resnet18", 4.0, size=64)
    assert diff <= 1e-4
    assert n_params(converted) == kwconvert.plan_of(converted).params_converted


def test_a_plan_beyond_the_available_memory_is_refused_before_allocating(monkeypatch):
    model = torchvision.models.resnet18(weights=None)
    plan = kwconvert.plan(model, 4.0)
    needed = sum(w.warehouse_params + w.attention_params for w in plan.warehouses) * 4
    monkeypatch.setattr(rewrite, "available_memory", lambda: needed - 1)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"the plan at b=4 needs 0\.\d GiB .* more than the 0\.\d GiB of memory "
                                         r"available: choose a smaller budget"):
        kwconvert.convert(model, plan)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # untouched
    monkeypatch.setattr(rewrite, "available_memory", lambda: needed)
    kwconvert.convert(model, plan)  # exactly enough is enough


def test_available_memory_reads_the_kernels_figure():
    available = rewrite.available_memory()
    assert available is None or 0 < available < 1 << 50


def test_inplace_false_leaves_the_original_untouched():
    model = torchvision.models.resnet18(weights=None)
    before = copy.deepcopy(model.state_dict())
    converted = kwconvert.convert(model, 1.0, inplace=False)
    assert not any(isinstance(m, KW_LAYER_TYPES) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(isinstance(m, KW_LAYER_TYPES) for m in converted.modules())


def test_converted_model_keeps_class_forward_and_other_modules():
    model = torchvision.models.resnet18(weights=None)
    bn = model.bn1
    fc = model.fc
    converted = kwconvert.convert(model, 1.0)
    assert converted is model and converted.bn1 is bn and converted.fc is fc
    assert isinstance(converted.layer1[0].conv1, KW_LAYER_TYPES)
    assert type(converted).forward is torchvision.models.ResNet.forward
    plan = kwconvert.plan_of(converted)
    assert set(plan.converted_layers) == {n for n, m in converted.named_modules() if isinstance(m, KW_LAYER_TYPES)}
    assert all(layer.tau == 1.0 for layer in converted.modules() if isinstance(layer, KW_LAYER_TYPES))


def test_the_layers_of_a_warehouse_share_one_warehouse_module():
    converted = kwconvert.convert(torchvision.models.resnet18(weights=None), 1.0)
    plan = kwconvert.plan_of(converted)
    for warehouse_plan in plan.warehouses:
        layers = [converted.get_submodule(layer.name) for layer in warehouse_plan.layers]
        assert all(layer.warehouse is layers[0].warehouse for layer in layers)
    cells = [n for n, _ in converted.named_parameters() if n.endswith(".cells")]
    assert len(cells) == len(plan.warehouses)  # parameters() yields each shared warehouse once


class TwiceUsed(nn.Module):
    """One conv applied at two places: converting it must swap both uses."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.shared = nn.Conv2d(16, 16, 3, padding=1)
        self.alias = self.shared
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = self.shared(torch.relu(x)) + x
        x = self.alias(torch.relu(x)) + x
        return self.head(x.mean((2, 3)))


def test_module_used_at_two_places_is_swapped_everywhere():
    torch.manual_seed(0)
    model = TwiceUsed().eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    converted = kwconvert.convert(model, 1.0, stem="warehouse").eval()
    assert converted.alias is converted.shared
    with torch.no_grad():
        assert (converted(x) - expected).abs().max() <= 1e-4


def test_b_below_1_fits_cells_and_reports_the_fit_error():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    converted = kwconvert.convert(model, 0.5, inplace=False)
    plan = kwconvert.plan_of(converted)
    errors = [w.init_error for w in plan.warehouses]
    assert all(e is not None and 0 < e < 1 for e in errors)
    # The reported error is the one the layers really start from at tau = 1.
    warehouse = plan.warehouses[0]
    num = den = 0.0
    for name in warehouse.layer_names:
        kw_layer = converted.get_submodule(name)
        static = model.get_submodule(name).weight.detach()
        assembled = kw_layer.kernel_at_beta().detach()
        num += float(((assembled - static) ** 2).sum())
        den += float((static ** 2).sum())
    assert abs((num / den) ** 0.5 - warehouse.init_error) < 1e-4
    # And it beats the reference's one-to-one start, which zeroes the blocks left on e_z.
    assert warehouse.init_error < 0.9


def assert_fit_reported(plan) -> None:
    """Below 1 every warehouse reports its fit; one the allocator set to b' = 1 is exact."""
    assert all(w.init_error == 0 if w.budget >= 1 else 0 < w.init_error < 1 for w in plan.warehouses)
    assert any(w.budget < 1 for w in plan.warehouses)


@pytest.mark.parametrize("name, budget", [("resnet18", 0.4), ("mobilenet_v2", 1 / 3), ("mobilenet_v2", 0.75)])
def test_a_planned_budget_below_1_always_converts_with_a_fit(name, budget):
    """Budgets other than 1/k used to plan walks longer than n: planned, then refused by convert."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    plan = kwconvert.plan(model, budget)
    converted = kwconvert.convert(model, plan, inplace=False).eval()
    assert n_params(converted) == plan.params_converted
    assert_fit_reported(kwconvert.plan_of(converted))
    with torch.no_grad():
        assert torch.isfinite(converted(torch.randn(1, 3, 64, 64))).all()


@pytest.mark.parametrize("name, budget", [("resnet18", 1.5), ("resnet18", 2.5), ("mobilenet_v2", 3)])
def test_budgets_above_1_that_are_not_the_papers_reproduce_the_original(name, budget):
    diff, _, converted = outputs_match(name, budget, size=64)
    assert diff <= 1e-4
    assert n_params(converted) == kwconvert.plan_of(converted).params_converted


@pytest.mark.slow
@pytest.mark.parametrize("budget", [0.25, 0.3, 1 / 3, 0.4, 0.5, 0.6, 2 / 3, 0.75, 1, 1.5, 2.5, 3])
def test_r2plus1d_converts_at_any_budget(budget):
    """conv3d, with an odd input-channel GCD (45) that b < 1 cuts to cells of 15."""
    torch.manual_seed(0)
    model = torchvision.models.get_model("r2plus1d_18", weights=None).eval()
    converted = kwconvert.convert(model, budget, example_inputs=torch.randn(1, 3, 8, 112, 112), inplace=False)
    plan = kwconvert.plan_of(converted)
    assert n_params(converted) == plan.params_converted
    x = torch.randn(1, 3, 4, 56, 56)
    with torch.no_grad():
        diff = (converted.eval()(x) - model(x)).abs().max().item()
    if budget >= 1:
        assert diff <= 1e-4 and all(w.init_error == 0 for w in plan.warehouses)
    else:
        assert_fit_reported(plan)


def test_random_init_differs_from_the_original():
    model = torchvision.models.resnet18(weights=None).eval()
    random_converted = kwconvert.convert(model, 1.0, init="random", inplace=False).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (model(x) - random_converted(x)).abs().max() > 1e-3


@pytest.mark.parametrize("budget, spread", [(1.0, 1.0), (4.0, 0.5)])
def test_random_init_starts_every_kernel_at_the_reference_spread(budget, spread):
    """At tau = 1 a from-scratch layer's kernel is its beta cells: at b = 1 with the plain
    layer's kaiming (fan_out, relu) spread, at b = 4 half of it (the reference draws each
    layer's 4 m cells as one tensor).  ResNet18's layers all read c_e channels, so the
    spread is exact there; the accuracy benchmark's short-run gap is not an init scale."""
    torch.manual_seed(0)
    converted = kwconvert.convert(torchvision.models.resnet18(weights=None), budget, init="random")
    layers = [(name, m) for name, m in converted.named_modules() if isinstance(m, KW_LAYER_TYPES)]
    assert len(layers) == 19  # 16 block convs and 3 projections; the stem stays plain
    for name, layer in layers:
        fan_out = layer.weight_shape[0] * math.prod(layer.weight_shape[2:])
        with torch.no_grad():
            std = layer.kernel_at_beta().std().item()
        assert std == pytest.approx(spread * math.sqrt(2 / fan_out), rel=0.1), name


def test_training_step_updates_warehouses_and_attention():
    model = kwconvert.convert(torchvision.models.resnet18(weights=None, num_classes=10), 1.0)
    set_temperature(model, 0.5)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 64, 64)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    optimiser.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert any(".cells" in n for n in changed)
    assert any("attention" in n for n in changed)


def test_a_plan_that_does_not_fit_is_rejected_before_any_change():
    model = torchvision.models.resnet18(weights=None)
    plan = kwconvert.plan(model, 1.0)
    data = plan.to_dict()
    data["warehouses"][0]["m"][0] += 1
    with pytest.raises(ValueError, match=r"m is 10 but cell .* tiles the kernel in 9"):
        kwconvert.Plan.from_dict(data)  # refused as it is read: the plan contradicts itself
    edited = dataclasses.replace(plan, warehouses=plan.warehouses[1:])  # consistent, but leaves stage 1 out
    with pytest.raises(ValueError, match="does not mention the model's layer layer1.0.conv1"):
        kwconvert.convert(model, edited)
    assert not any(isinstance(m, KW_LAYER_TYPES) for m in model.modules())
    data = plan.to_dict()
    data["warehouses"][1]["n"] += 3
    with pytest.raises(ValueError, match="n is"):
        check_plan_fits(model, kwconvert.Plan.from_dict(data))
    other = torchvision.models.resnet34(weights=None)
    with pytest.raises(ValueError, match="does not mention the model's layer layer1.2.conv1"):
        check_plan_fits(other, plan)


def test_bad_init_and_double_conversion_are_refused():
    model = torchvision.models.resnet18(weights=None)
    with pytest.raises(ValueError, match="init must be one of"):
        kwconvert.convert(model, 1.0, init="zeros")
    kwconvert.convert(model, 1.0)
    with pytest.raises(ValueError, match="already converted"):
        kwconvert.convert(model, 1.0)


# --- vision transformers, Sequential roots ------------------------------------------------------
def test_fused_qkv_converts_value_rows_only_and_keeps_the_outputs():
    import timm
    from kwconvert import reference_path
    from kwconvert.methods.kernelwarehouse.layers import PartlyDynamicLinear
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224").eval()
    converted = kwconvert.convert(model, 1.0, inplace=False).eval()
    qkv = converted.blocks[0].attn.qkv
    assert isinstance(qkv, PartlyDynamicLinear) and qkv.rows == (384, 576)
    assert type(qkv.static) is nn.Linear and qkv.static.out_features == 384
    assert isinstance(qkv.dynamic, KW_LAYER_TYPES)
    assert n_params(converted) == kwconvert.plan_of(converted).params_converted
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad(), reference_path():
        assert (converted(x) - model(x)).abs().max() <= 1e-5


def test_multihead_attention_is_unpacked_for_good_with_outputs_kept(tmp_path):
    from torchvision.models.vision_transformer import VisionTransformer
    from kwconvert.multihead import UnpackedMultiheadAttention
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                              mlp_dim=64, num_classes=10).eval()
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-initialises the head
    converted = kwconvert.convert(model, 1.0, example_inputs=torch.randn(1, 3, 32, 32), inplace=False).eval()
    attention = converted.encoder.layers[0].self_attention
    assert isinstance(attention, UnpackedMultiheadAttention)
    assert isinstance(attention.v_proj, KW_LAYER_TYPES) and isinstance(attention.out_proj, KW_LAYER_TYPES)
    assert type(attention.q_proj) is nn.Linear
    assert type(model.encoder.layers[0].self_attention) is nn.MultiheadAttention  # original untouched
    assert n_params(converted) == kwconvert.plan_of(converted).params_converted
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        # relative to the outputs' scale: the accumulation order (and so the rounding) differs
        # between CPUs (AVX2 / AVX-512 kernels); 2**7 float32 epsilons is 1.5e-5
        tolerance = 2**7 * torch.finfo(torch.float32).eps * expected.abs().max()
        assert (converted(x) - expected).abs().max() <= tolerance
    kwconvert.save(converted, tmp_path / "vit")
    again = kwconvert.load(tmp_path / "vit", model=model).eval()
    with torch.no_grad():
        assert torch.equal(again(x), converted(x))


def test_a_converted_sequential_still_runs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.Flatten(), nn.Linear(4096, 2))
    x = torch.randn(2, 3, 12, 12)
    converted = kwconvert.convert(model, 1.0, example_inputs=x[:1], inplace=False)
    assert len(kwconvert.plan_of(converted).converted_layers) == 2
    with torch.no_grad():
        assert (converted(x) - model(x)).abs().max() <= 1e-5


def test_timm_same_padding_and_weight_standardisation_convert_exactly():
    from timm.layers import Conv2dSame, ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d
    from kwconvert.compat import SamePadded
    torch.manual_seed(0)
    model = nn.Sequential(Conv2dSame(3, 64, 3, stride=2), nn.ReLU(), StdConv2d(64, 64, 3, padding=1), nn.ReLU(),
                          ScaledStdConv2dSame(64, 64, 3, stride=2), nn.ReLU(), ScaledStdConv2d(64, 64, 1),
                          nn.Flatten(), nn.Linear(64 * 16, 2)).eval()
    x = torch.randn(2, 3, 15, 15)
    converted = kwconvert.convert(model, 1.0, example_inputs=x[:1], inplace=False, max_params_ratio=100).eval()
    plan = kwconvert.plan_of(converted)
    assert plan.converted_layers == ("0", "2", "4", "6")
    assert isinstance(converted[0], SamePadded) and isinstance(converted[4], SamePadded)
    assert isinstance(converted[2], KW_LAYER_TYPES) and isinstance(converted[6], KW_LAYER_TYPES)
    assert n_params(converted) == plan.params_converted  # the gains of the scaled convs are dropped
    with torch.no_grad():
        assert (converted(x) - model(x)).abs().max() <= 1e-5


# --- one memory format for the converted model ------------------------------------------------


def test_the_plain_convolutions_left_get_channels_last_weights_and_a_contiguous_state_dict(tmp_path):
    """resnet18's stem stays plain: its weight turns channels-last like the KW layers' maps (so its
    output and the max pool after it are too), holding the same values; the state dict still holds
    contiguous tensors (safetensors' save_model takes it), and a saved model loads back the same."""
    from safetensors.torch import load_model, save_model

    original = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    model = kwconvert.convert(copy.deepcopy(original), 1.0).eval()
    stem = model.conv1
    assert type(stem) is nn.Conv2d and stem.weight.is_contiguous(memory_format=torch.channels_last)
    assert not stem.weight.is_contiguous() and torch.equal(stem.weight, original.conv1.weight)
    state = model.state_dict()
    assert all(value.is_contiguous() for value in state.values())
    assert model.state_dict(keep_vars=True)["conv1.weight"] is stem.weight
    save_model(model, str(tmp_path / "state.safetensors"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        stem_out = stem(x)
        assert stem_out.is_contiguous(memory_format=torch.channels_last) and not stem_out.is_contiguous()
        assert (model(x) - original(x)).abs().max() <= 1e-4 * original(x).abs().max()
    fresh = kwconvert.convert(torchvision.models.resnet18(weights=None, num_classes=10), 1.0, init="none")
    load_model(fresh, str(tmp_path / "state.safetensors"))
    assert fresh.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    kwconvert.save(model, tmp_path / "saved")
    loaded = kwconvert.load(tmp_path / "saved", model=torchvision.models.resnet18(weights=None, num_classes=10))
    assert loaded.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))


class PatchesThenTokens(nn.Module):
    """A convolution over the image, then Linear layers over its pixels as tokens (a ViT's shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.patches = nn.Conv2d(3, 16, 2, stride=2)
        self.mlp = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.patches(x).flatten(2).transpose(1, 2)).mean(1)


def test_a_model_without_kw_convolutions_keeps_its_convolutions_as_they_are():
    """Only where KW Conv2d layers set the maps' format: a model whose convolution stays plain
    (only its Linear layers converted) keeps an NCHW weight."""
    converted = kwconvert.convert(PatchesThenTokens(), 1.0, example_inputs=(torch.randn(2, 3, 8, 8),),
                                  exclude=["patches"])
    kinds = {type(m).__name__ for m in converted.modules()}
    assert "KWLinear" in kinds and "KWConv2d" not in kinds
    assert converted.patches.weight.is_contiguous()
