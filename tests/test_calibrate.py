"""Cells fitted to the outputs on calibration inputs (kwconvert.calibrate, convert(calibration=...))."""
import pytest
import torch
from torch import nn
from torch.func import functional_call

import kwconvert
from kwconvert.methods.kernelwarehouse import calibrate
from kwconvert.plan import Plan

from .test_bad_input import small_cnn


def exact_energy(module: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> float:
    """|layer(x) with kernel delta and no bias|^2, computed by the layer itself."""
    params = {"weight": delta}
    if module.bias is not None:
        params["bias"] = torch.zeros_like(module.bias)
    return float(functional_call(module, params, (x,)).square().sum())


LAYERS = [
    (lambda: nn.Conv2d(6, 8, 3, padding=1), (2, 6, 9, 9)),
    (lambda: nn.Conv2d(6, 8, 3, stride=2, dilation=2, padding=2, groups=2), (2, 6, 11, 10)),
    (lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6), (2, 6, 7, 7)),                       # depthwise
    (lambda: nn.Conv2d(4, 8, (3, 2), padding="same", padding_mode="reflect"), (2, 4, 8, 9)),
    pytest.param(lambda: nn.Conv2d(4, 8, 4, padding="same"), (2, 4, 8, 8),                 # even kernel
                 marks=pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")),
    (lambda: nn.Conv2d(4, 8, 3, padding=1, padding_mode="circular"), (2, 4, 6, 6)),
    (lambda: nn.Conv1d(4, 6, 5, stride=2, padding=2, padding_mode="replicate"), (3, 4, 17)),
    (lambda: nn.Conv1d(4, 6, 3, padding="valid"), (4, 9)),                                  # unbatched
    (lambda: nn.Linear(12, 5), (2, 7, 12)),                                                 # tokens
]


@pytest.mark.parametrize("make, shape", LAYERS)
def test_the_gram_gives_each_layers_output_energy_exactly(make, shape):
    """tr(D G D^T) over the groups equals |conv(x, D)|^2 for any kernel D: the identity the fit rests on."""
    torch.manual_seed(0)
    layer = make().double()
    x = torch.randn(shape, dtype=torch.float64)
    gram = calibrate.input_grams(layer, {"": layer}, x)[""]
    delta = torch.randn_like(layer.weight)
    groups = getattr(layer, "groups", 1)
    rows = delta.reshape(groups, delta.shape[0] // groups, -1)
    assert float(((rows @ gram) * rows).sum()) == pytest.approx(exact_energy(layer, x, delta), rel=1e-5)


def test_batches_add_up_to_their_concatenation(monkeypatch):
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(6, 3, 8, 8)
    whole = calibrate.input_grams(layer, {"c": layer}, x)["c"]
    monkeypatch.setattr(calibrate, "PATCH_CHUNK", 200)  # and in chunks of a sample within a batch
    parts = calibrate.input_grams(layer, {"c": layer}, (batch for batch in x.split(4)))["c"]
    assert torch.allclose(whole, parts, rtol=1e-5, atol=1e-6 * float(whole.abs().max()))  # float32 products


def test_the_output_energy_is_exact_on_a_gram_of_low_rank(monkeypatch):
    """Past GRAM_RANK the fit keeps the largest directions; a Gram within that rank is kept whole."""
    torch.manual_seed(0)
    patches = torch.randn(1, 300, 40, dtype=torch.float64)
    gram = patches @ patches.transpose(1, 2)  # rank 40, D = 300
    monkeypatch.setattr(calibrate, "GRAM_RANK", 64)
    energy = calibrate._OutputEnergy(gram, torch.float64)
    rows = torch.randn(1, 7, 300, dtype=torch.float64)
    assert float(energy(rows)) == pytest.approx(float(((rows @ gram) * rows).sum()), rel=1e-6)


class Correlated(nn.Module):
    """Inputs whose channels are mixtures of a few sources, as trained features are: the
    directions the SVD fit spends its cells on are not the ones the outputs need."""

    def __init__(self) -> None:
        super().__init__()
        self.body = small_cnn()
        self.mix = nn.Conv2d(3, 3, 1, bias=False)

    def forward(self, x):
        return self.body(self.mix(x))


def inputs(count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, 12, 12, generator=generator).cumsum(-1) / 3  # smooth along a row


def layer_output_error(model: nn.Module, converted: nn.Module, x: torch.Tensor) -> float:
    """Relative error of every converted layer's output on the input the original gives it."""
    names = kwconvert.plan_of(converted).converted_layers
    seen = {}
    hooks = [model.get_submodule(name).register_forward_hook(
        lambda m, i, o, name=name: seen.__setitem__(name, (i[0], o))) for name in names]
    with torch.no_grad():
        model(x)
        for hook in hooks:
            hook.remove()
        errors = [float((converted.get_submodule(name)(seen[name][0]) - seen[name][1]).norm() / seen[name][1].norm())
                  for name in names]
    return sum(errors) / len(errors)


def test_fitting_to_outputs_beats_fitting_kernels_on_held_out_inputs():
    torch.manual_seed(0)
    model = Correlated().eval()
    plain_fit = kwconvert.convert(model, 0.5, inplace=False, stem="warehouse").eval()
    output_fit = kwconvert.convert(model, 0.5, inplace=False, stem="warehouse",
                                   calibration=[inputs(32, 1), inputs(32, 2)]).eval()
    held_out = inputs(64, 3)
    kernel_only, calibrated = layer_output_error(model, plain_fit, held_out), layer_output_error(model, output_fit, held_out)
    assert calibrated < 0.7 * kernel_only
    with torch.no_grad():
        expected = model(held_out)
        assert (output_fit(held_out) - expected).norm() < (plain_fit(held_out) - expected).norm()
    fitted = [(w, kernels_fit) for w, kernels_fit in zip(kwconvert.plan_of(output_fit).warehouses,
                                                           kwconvert.plan_of(plain_fit).warehouses)
              if kernels_fit.init_error > 0.1]  # the 1x1 "mix" fits exactly, conv1 got b' = 1
    assert len(fitted) == 2
    for warehouse, kernels_fit in fitted:
        assert 0 < warehouse.output_error < 0.5 and kernels_fit.output_error is None
        # the kernels are approximated worse, on purpose: init_error still reports them truly
        assert warehouse.init_error > kernels_fit.init_error


def test_the_fitted_model_is_the_same_at_every_temperature():
    """Issue 14: below 1 the output at every tau is the output at tau = 1 (the fit)."""
    torch.manual_seed(0)
    model = Correlated().eval()
    converted = kwconvert.convert(model, 0.5, stem="warehouse", calibration=inputs(16, 1)).eval()
    x = inputs(4, 5)
    with torch.no_grad():
        outputs = []
        for tau in (1.0, 0.5, 0.0):
            kwconvert.set_temperature(converted, tau)
            outputs.append(converted(x))
    scale = outputs[0].abs().max()
    assert all((other - outputs[0]).abs().max() <= 1e-5 * scale for other in outputs[1:])


def test_the_output_error_survives_json_and_a_save(tmp_path):
    torch.manual_seed(0)
    converted = kwconvert.convert(small_cnn(), 0.5, calibration=torch.randn(8, 3, 12, 12))
    plan = kwconvert.plan_of(converted)
    assert Plan.from_json(plan.to_json()) == plan
    kwconvert.save(converted, tmp_path / "m")
    loaded = kwconvert.load(tmp_path / "m", small_cnn())
    assert [w.output_error for w in kwconvert.plan_of(loaded).warehouses] == [w.output_error for w in plan.warehouses]


def test_a_warehouse_with_a_layer_it_cannot_weigh_keeps_the_kernel_fit():
    model = nn.Sequential(nn.Conv3d(16, 128, 1), nn.ReLU(), nn.Conv3d(128, 128, 1), nn.ReLU(), nn.Conv3d(128, 128, 1))
    x = torch.randn(2, 16, 2, 4, 4)
    converted = kwconvert.convert(model, 0.5, inplace=False, stem="warehouse", allocate=False, example_inputs=(x[:1],),
                                  calibration=x)
    fitted = [w for w in kwconvert.plan_of(converted).warehouses if w.budget < 1]
    assert fitted and all(w.output_error is None and w.init_error > 0 for w in fitted)


@pytest.mark.parametrize("calibration, init, error, pattern", [
    (torch.randn(2, 3, 12, 12), "random", ValueError, "needs init='preserve'"),
    (torch.randn(2, 5, 12, 12), "preserve", RuntimeError, "to have 3 channels"),  # the model's own error
    ([], "preserve", ValueError, "the calibration inputs are empty"),
    (3.0, "preserve", TypeError, "calibration must be a tensor of inputs, or an iterable"),
    ([[torch.randn(2, 3, 12, 12), torch.zeros(2)]], "preserve", TypeError, r"a DataLoader's \[inputs, labels\]\?"),
])
def test_bad_calibration_inputs_are_refused(calibration, init, error, pattern):
    with pytest.raises(error, match=pattern):
        kwconvert.convert(small_cnn(), 0.5, init=init, calibration=calibration)
