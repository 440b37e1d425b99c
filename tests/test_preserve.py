"""A converted trained model keeps its function at every temperature (``init="preserve"``).

b >= 1: the converted model equals the original at tau = 0, 0.5 and 1, in eval and in
train mode's first forward, for every kind of layer kwconvert converts.  b < 1: the output
is the same at every tau (the fitted cells are the only difference from the original).
The attention still learns to be dynamic once trained.
"""
import copy

import pytest
import torch
import torchvision
from torch import nn

import kwconvert
from kwconvert.methods.kernelwarehouse.layers import (CAF_EPS, HOLDABLE_BETA_L1, KWAttention, contrasting_attention, holding_logits,
                              is_kw_layer, set_temperature)
from kwconvert.rewrite import converted_layers
from kwconvert.training import parameter_groups

from .helpers import trained_like
from .test_export import TinyCNN, TokenMLP

TEMPERATURES = (1.0, 0.5, 0.0)
#: float32: max |diff| relative to the output's scale; float64: the same, far tighter.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10}


class Conv1dNet(nn.Module):
    """A Conv1d model (audio / sequence style): dense, grouped, depthwise, pointwise, head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(4, 16, 5, padding=2)
        self.bn = nn.BatchNorm1d(16)
        self.grouped = nn.Conv1d(16, 32, 3, stride=2, padding=1, groups=2)
        self.depthwise = nn.Conv1d(32, 32, 3, padding=1, groups=32)
        self.pointwise = nn.Conv1d(32, 32, 1)
        self.head = nn.Linear(32, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        for conv in (self.grouped, self.depthwise, self.pointwise):
            x = torch.relu(conv(x))
        return self.head(x.mean(-1))


def scale_of(output: torch.Tensor) -> float:
    return max(float(output.abs().max()), torch.finfo(output.dtype).tiny)


def outputs_at(model: nn.Module, x: torch.Tensor, tau: float | None, train: bool) -> torch.Tensor:
    """One forward of a fresh copy (train mode updates BatchNorm statistics), same dropout draws."""
    model = copy.deepcopy(model).train(train)
    if tau is not None:
        set_temperature(model, tau)
    torch.manual_seed(1)
    with torch.no_grad():
        return model(x)


def convert(model: nn.Module, budget: float, input_size: tuple[int, ...], dtype=torch.float32,
            **options) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = trained_like(model).to(dtype).eval()
    x = torch.randn(3, *input_size, dtype=dtype)
    converted = kwconvert.convert(model, budget, example_inputs=(x[:1],), inplace=False, **options)
    return model, converted, x


GRID = {
    # name: (model, one sample's input size, plan options); every candidate converts
    "conv2d-grouped-depthwise": (TinyCNN, (3, 16, 16), {}),
    "conv2d-reflect": (lambda: TinyCNN(padding_mode="reflect"), (3, 12, 12), {}),
    "conv1d": (Conv1dNet, (4, 20), {}),
    "conv3d": (lambda: TinyCNN(nn.Conv3d), (3, 6, 6, 6), {}),
    "linear-tokens": (TokenMLP, (7, 24), {}),
    "dynamic-conv": (TinyCNN, (3, 12, 12), {"mode": "dynamic_conv"}),
}
EVERYTHING = {"stem": "warehouse", "max_params_ratio": 100}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("budget", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("name", GRID)
def test_at_b_1_and_above_the_original_is_kept_at_every_temperature(name, budget, train, dtype):
    build, input_size, options = GRID[name]
    original, converted, x = convert(build(), budget, input_size, dtype, **EVERYTHING, **options)
    assert sum(1 for _ in converted_layers(converted)) >= 3
    expected = outputs_at(original, x, None, train)
    for tau in TEMPERATURES:
        diff = (outputs_at(converted, x, tau, train) - expected).abs().max()
        assert diff <= TOLERANCE[dtype] * scale_of(expected), (tau, float(diff))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("budget", [0.5, 0.4, 0.25])
@pytest.mark.parametrize("name", ["conv2d-grouped-depthwise", "conv1d", "linear-tokens"])
def test_below_b_1_every_temperature_gives_the_fitted_model_of_tau_1(name, budget, dtype):
    build, input_size, options = GRID[name]
    # every warehouse at b (tiny models' attention outweighs their cells: the allocator would set b' = 1)
    original, converted, x = convert(build(), budget, input_size, dtype, **EVERYTHING, **options, allocate=False)
    plan = kwconvert.plan_of(converted)
    assert all(0 < w.init_error < 1 for w in plan.warehouses)  # the fit is still reported
    at_one = outputs_at(converted, x, 1.0, False)
    assert (at_one - outputs_at(original, x, None, False)).abs().max() > 1e-3 * scale_of(at_one)
    for tau in TEMPERATURES[1:]:
        diff = (outputs_at(converted, x, tau, False) - at_one).abs().max()
        assert diff <= TOLERANCE[dtype] * scale_of(at_one), (tau, float(diff))


ZOO = {
    # name: (build, input size, budget, plan options)
    "resnet18": (lambda: torchvision.models.resnet18(weights=None), (3, 64, 64), 1.0, {}),
    "resnet18-head": (lambda: torchvision.models.resnet18(weights=None), (3, 32, 32), 1.0, {"head": "warehouse"}),
    "resnet50-b1/2": (lambda: torchvision.models.resnet50(weights=None), (3, 32, 32), 0.5, {}),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(weights=None), (3, 64, 64), 1.0, {}),
    # the allocator: b' = 1 and 1/2 side by side, narrowed attentions, the classifier fitted
    "mobilenet_v2-b1/2": (lambda: torchvision.models.mobilenet_v2(weights=None), (3, 32, 32), 0.5, {}),
    "deit_tiny": (lambda: __import__("timm").create_model("deit_tiny_patch16_224"), (3, 224, 224), 1.0, {}),
}


@pytest.mark.parametrize("name", ZOO)
def test_zoo_models_keep_their_function_at_every_temperature(name):
    build, input_size, budget, options = ZOO[name]
    original, converted, x = convert(build(), budget, input_size, **options)
    plan = kwconvert.plan_of(converted)
    assert sum(p.numel() for p in converted.parameters()) == plan.params_converted
    heads = [w for w in plan.warehouses if w.name == "head.linear"]  # the classifier as a mixture
    assert bool(heads) == (name in ("resnet18-head", "mobilenet_v2-b1/2"))
    assert all((head.init_error == 0) == (budget >= 1) for head in heads)  # exact, or fitted and reported
    x = x[:2]
    reference = outputs_at(original, x, None, False) if budget >= 1 else outputs_at(converted, x, 1.0, False)
    for tau in TEMPERATURES:
        diff = (outputs_at(converted, x, tau, False) - reference).abs().max()
        assert diff <= TOLERANCE[torch.float32] * scale_of(reference), (tau, float(diff))
    if name == "resnet50-b1/2":  # the parameter saver's logits are held too
        assert all(w.basis_ratio for w in plan.warehouses)
    if name == "deit_tiny":  # query and key stay static, values and MLPs are mixtures
        assert any(name.endswith("mlp.fc1") for name, _ in converted_layers(converted))


def test_holding_logits_make_caf_return_beta_at_every_temperature():
    generator = torch.Generator().manual_seed(0)
    beta = torch.randn(5, 7, generator=generator, dtype=torch.float64)
    beta *= HOLDABLE_BETA_L1 / beta.abs().sum(-1, keepdim=True) * torch.linspace(0, 1, 5, dtype=torch.float64)[:, None]
    logits = holding_logits(beta)
    assert logits.shape == (5, 8)
    for tau in (0.0, 0.3, 1.0):
        full_beta = torch.cat([beta, torch.zeros(5, 1, dtype=torch.float64)], 1)
        alpha = contrasting_attention(logits, full_beta, tau)[:, :-1]
        torch.testing.assert_close(alpha, beta, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="cannot be held"):
        holding_logits(torch.tensor([[0.7, -0.4]]))


def test_one_to_one_rows_are_scaled_into_reach_with_the_cells_scaled_back():
    torch.manual_seed(0)
    model = trained_like(torchvision.models.resnet18(weights=None))
    converted = kwconvert.convert(model, 1.0, inplace=False)
    for name, layer in converted_layers(converted):
        beta = layer.attention.beta[:, :-1]
        assert torch.allclose(beta.abs().sum(-1), torch.full((beta.shape[0],), HOLDABLE_BETA_L1))
        # Every kernel is still the original's, to float rounding.
        static = model.get_submodule(name).weight
        torch.testing.assert_close(layer.kernel_at_beta(), static, rtol=1e-5, atol=1e-6)


def attention_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every attention parameter but the empty fc3 of a saver with no nonlocal cells."""
    return {name: p for name, p in model.named_parameters() if ".attention." in name and p.numel()}


@pytest.mark.parametrize("budget, options", [(1.0, {}), (0.5, {"param_saver": True, "allocate": False})],
                         ids=["b1", "b1/2-saver"])
def test_every_attention_parameter_learns_within_two_steps(budget, options):
    """The held start is not a dead end: the zero projection passes gradients on."""
    torch.manual_seed(0)
    model = kwconvert.convert(TinyCNN(), budget, example_inputs=(torch.randn(1, 3, 16, 16),), **EVERYTHING, **options)
    if options:
        assert all(layer.attention.basis_ratio for _, layer in converted_layers(model))
    set_temperature(model, 0.0)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05)
    touched: set[str] = set()
    for step in range(2):
        optimiser.zero_grad()
        loss = nn.functional.cross_entropy(model(torch.randn(6, 3, 16, 16)), torch.arange(6) % 4)
        loss.backward()
        touched |= {name for name, p in attention_parameters(model).items()
                    if p.grad is not None and p.grad.abs().max() > 0}
        optimiser.step()
    assert touched == set(attention_parameters(model))


def test_after_a_short_fine_tune_the_attentions_differ_between_samples():
    torch.manual_seed(0)
    model = kwconvert.convert(trained_like(TinyCNN()).eval(), 1.0, example_inputs=(torch.randn(1, 3, 12, 12),),
                              stem="warehouse")
    set_temperature(model, 0.0)
    layers = [m for m in model.modules() if is_kw_layer(m)]
    x = torch.randn(8, 3, 12, 12)

    def spread() -> float:
        alphas = []
        hooks = [layer.attention.register_forward_hook(lambda m, i, out: alphas.append(out)) for layer in layers]
        with torch.no_grad():
            model.eval()(x)
        for hook in hooks:
            hook.remove()
        return max(float(alpha.std(dim=0).max()) for alpha in alphas)

    assert spread() == 0.0  # held: every sample gets beta
    optimiser = torch.optim.SGD(parameter_groups(model, 0.05), lr=0.05, momentum=0.9)  # the README's recipe
    targets = torch.randint(0, 10, (8,))
    spreads = []
    for _ in range(4):
        model.train()
        for _ in range(10):
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x), targets).backward()
            optimiser.step()
        spreads.append(spread())
    # The held logits (L1 norm HELD_LOGIT_SCALE) make it learn gently, then faster and faster.
    assert 0 < spreads[0] < spreads[1] < spreads[2] < spreads[3] and spreads[3] > 1e-4, spreads


def test_random_init_keeps_the_papers_input_dependent_attention():
    """From scratch nothing changes: fc2 is kaiming-initialised, beta one-to-one."""
    torch.manual_seed(0)
    model = kwconvert.convert(torchvision.models.resnet18(weights=None), 1.0, init="random")
    for _, layer in converted_layers(model):
        assert layer.attention.fc2.weight.abs().max() > 0
        assert torch.equal(layer.attention.beta.abs().sum(-1), torch.ones(layer.cells))


def test_hold_beta_on_a_bare_attention_leaves_the_pooled_input_out():
    attention = KWAttention(8, 16, cells=4, n=6, offset=1, budget=1.0)
    attention.beta.mul_(HOLDABLE_BETA_L1)
    attention.hold_beta()
    attention.tau = 0.0
    attention.eval()
    alpha = attention(torch.randn(3, 8, 5, 5))
    assert torch.allclose(alpha, attention.beta[:, :-1].expand(3, -1, -1), atol=CAF_EPS * 1e-3)
