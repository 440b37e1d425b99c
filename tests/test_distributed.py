"""Converted models train under DistributedDataParallel: two CPU processes, gloo, loopback.

Each rank takes half of a global batch; after one step its gradients (and its weights
after an SGD step) must equal those of one process over the whole batch, shared
warehouses included, under DDP's strict default ``find_unused_parameters=False``: a
parameter left without a gradient, or reduced twice, fails the second iteration, which
every rank runs.  Gradients are compared in float64 so that the test measures DDP's
reduction, not float32 rounding (a batch of 3 and a batch of 6 may take different
convolution paths).

SyncBatchNorm on CPU: ``nn.SyncBatchNorm.convert_sync_batchnorm`` converts every
BatchNorm of a converted model, the attention's BatchNorm1d included (checked here), but
torch 2.14 only synchronises statistics on GPUs: DDP refuses to wrap a CPU model that holds
SyncBatchNorm ("SyncBatchNorm layers only work with GPU modules").  So the exact
global-batch check runs (a) with BatchNorm in eval mode (frozen statistics, as when
fine-tuning a converted pretrained model) and (b) fully in training mode on a model
normalised per sample (GroupNorm, LayerNorm attention); training-mode BatchNorm without
synchronisation is checked against what DDP promises then, the mean of the ranks' own
gradients.  The SyncBatchNorm case runs for real as soon as torch supports it on CPU.
"""
from __future__ import annotations

import copy
import inspect
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock

import kwconvert

WORLD = 2
PER_RANK = 3
INPUT = (3, 16, 16)
TAU = 0.5  # attention in play: at tau = 1 its gradients are exactly zero
TOLERANCE = 1e-5

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")


class SmallResNet(nn.Module):
    """Stem and two stages of two basic blocks: kwconvert plans three warehouses, two shared."""

    def __init__(self, width: int = 32, norm=nn.BatchNorm2d) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), norm(width), nn.ReLU())
        down = nn.Sequential(nn.Conv2d(width, 2 * width, 1, 2, bias=False), norm(2 * width))
        self.blocks = nn.Sequential(
            BasicBlock(width, width, norm_layer=norm), BasicBlock(width, width, norm_layer=norm),
            BasicBlock(width, 2 * width, 2, down, norm_layer=norm), BasicBlock(2 * width, 2 * width, norm_layer=norm))
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


#: The other methods' scenarios (frozen BatchNorm): ``<method>-frozen-batchnorm``, their options.
METHODS = {"odconv": {"kernels": 2}, "kerneldna": {}}


def converted(scenario: str) -> nn.Module:
    """The model a scenario trains, converted at b = 1 (or by the scenario's method), float64, tau = TAU."""
    torch.manual_seed(0)
    method = scenario.split("-")[0]
    if scenario == "training-groupnorm":
        base = SmallResNet(norm=lambda channels: nn.GroupNorm(4, channels))
        options = {"attention_norm": "layernorm"}
    else:
        base = SmallResNet()
        options = {}
    if method in METHODS:  # randomly initialised heads and gates: every parameter has a gradient
        model = kwconvert.convert(base, method=method, init="random", example_inputs=(torch.zeros(1, *INPUT),),
                                  **METHODS[method])
    else:
        model = kwconvert.convert(base, 1.0, init="random", example_inputs=(torch.zeros(1, *INPUT),), **options)
        kwconvert.set_temperature(model, TAU)
    if scenario == "sync-batchnorm":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.double().train()
    if scenario.endswith("frozen-batchnorm"):
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    return model


def halves() -> list[slice]:
    """Each rank's part of the global batch."""
    return [slice(rank * PER_RANK, (rank + 1) * PER_RANK) for rank in range(WORLD)]


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(WORLD * PER_RANK, *INPUT, generator=generator, dtype=torch.float64)
    return images, torch.randint(0, 10, (WORLD * PER_RANK,), generator=generator)


def one_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of the mean cross-entropy, keyed like the unwrapped model's parameters."""
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(images), labels).backward()
    return {name.removeprefix("module."): p.grad.detach().clone() for name, p in model.named_parameters()}


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def parameters_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name.removeprefix("module."): p.detach().clone() for name, p in model.named_parameters()}


# --- the two ranks ------------------------------------------------------------------------
def _rank_main(rank: int, store: str, models: dict[str, nn.Module], out_dir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        images, labels = global_batch()
        mine = halves()[rank]
        results = {}
        for scenario, model in models.items():
            model = copy.deepcopy(model)  # spawn shares the parent's tensors: train a private copy
            ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
            optimizer = sgd(ddp)
            first = one_step(ddp, images[mine], labels[mine])
            optimizer.step()
            after = parameters_of(ddp)
            one_step(ddp, images[mine], labels[mine])  # DDP raises here if step 1 left a gradient unreduced
            results[scenario] = {"gradients": first, "after_step": after}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(directory, scenarios: tuple[str, ...]) -> list[dict]:
    """Run the scenarios on two ranks; each rank's results, by scenario."""
    models = {scenario: converted(scenario) for scenario in scenarios}
    mp.spawn(_rank_main, args=(str(directory / "store"), models, str(directory)), nprocs=WORLD, join=True)
    return [torch.load(directory / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]


def single_process(scenario: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Gradients over the whole global batch in one process, and the weights after one step."""
    model = converted(scenario)
    images, labels = global_batch()
    gradients = one_step(model, images, labels)
    sgd(model).step()
    return gradients, parameters_of(model)


def assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], scenario: str) -> None:
    assert actual.keys() == expected.keys(), scenario
    differences = {k: float((actual[k] - expected[k]).abs().max()) for k in expected}
    worst = max(differences, key=differences.get)
    assert differences[worst] <= TOLERANCE, f"{scenario}, {worst}: max |difference| {differences[worst]:.3g}"


def assert_dynamic_parts_learn(gradients: dict[str, torch.Tensor], method: str) -> None:
    """ODConv's kernels and heads, KernelDNA's scalings, gates and shared parent kernels."""
    own = {"odconv": (".attention.",), "kerneldna": (".gate.", ".position_scale", ".filter_scale")}[method]
    learning = [k for k in gradients if any(part in k for part in own)]
    assert learning and all(gradients[k].abs().sum() > 0 for k in learning)


def assert_warehouses_learn(gradients: dict[str, torch.Tensor]) -> None:
    shared = [k for k in gradients if k.endswith(".warehouse.cells")]
    attention = [k for k in gradients if ".attention." in k]
    assert shared and attention
    assert all(gradients[k].abs().sum() > 0 for k in shared + attention)


# --- tests --------------------------------------------------------------------------------
def test_every_batchnorm_becomes_syncbatchnorm_and_warehouses_are_shared():
    model = converted("sync-batchnorm")
    norms = {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms.values())
    assert any(name.endswith(".attention.norm") for name in norms)
    plan = kwconvert.plan_of(model)
    assert max(len(w.layers) for w in plan.warehouses) >= 6
    cells = [name for name, _ in model.named_parameters() if name.endswith(".warehouse.cells")]
    assert len(cells) == len(plan.warehouses)  # a shared warehouse is one parameter


def test_ddp_step_equals_one_process(tmp_path):
    """One launch of two ranks (it dominates the time) checks the three CPU scenarios, and the
    other methods' models with frozen BatchNorm."""
    others = tuple(f"{method}-frozen-batchnorm" for method in METHODS)
    ranks = run_ranks(tmp_path, ("frozen-batchnorm", "training-groupnorm", "training-batchnorm") + others)
    for scenario in others:
        gradients, after_step = single_process(scenario)
        assert_dynamic_parts_learn(gradients, scenario.split("-")[0])
        for rank in ranks:
            assert_close(rank[scenario]["gradients"], gradients, scenario)
            assert_close(rank[scenario]["after_step"], after_step, scenario)
    for scenario in ("frozen-batchnorm", "training-groupnorm"):  # exactly one process over the global batch
        gradients, after_step = single_process(scenario)
        assert_warehouses_learn(gradients)
        for rank in ranks:
            assert_close(rank[scenario]["gradients"], gradients, scenario)
            assert_close(rank[scenario]["after_step"], after_step, scenario)
    # Training-mode BatchNorm without synchronisation: DDP averages the ranks' own gradients.
    images, labels = global_batch()
    per_rank = [one_step(converted("training-batchnorm"), images[part], labels[part]) for part in halves()]
    expected = {k: sum(g[k] for g in per_rank) / WORLD for k in per_rank[0]}
    assert_warehouses_learn(expected)
    for rank in ranks:
        assert_close(rank["training-batchnorm"]["gradients"], expected, "training-batchnorm")


def _sync_batchnorm_trains_on_cpu() -> bool:
    """Whether this torch's DDP takes SyncBatchNorm on CPU modules and synchronises CPU tensors."""
    refusals = ((nn.parallel.DistributedDataParallel, "only work with GPU modules"),
                (nn.SyncBatchNorm.forward, "expected input tensor to be on GPU"))
    return not any(text in inspect.getsource(where) for where, text in refusals)


@pytest.mark.skipif(not _sync_batchnorm_trains_on_cpu(), reason=(
    f"torch {torch.__version__}: DDP refuses SyncBatchNorm on CPU (\"SyncBatchNorm layers only work with GPU "
    "modules\"); the conversion is checked, training runs with frozen or per-process BatchNorm"))
def test_ddp_with_syncbatchnorm_equals_one_process(tmp_path):
    ranks = run_ranks(tmp_path, ("sync-batchnorm",))
    gradients, after_step = single_process("sync-batchnorm")
    for rank in ranks:
        assert_close(rank["sync-batchnorm"]["gradients"], gradients, "sync-batchnorm")
        assert_close(rank["sync-batchnorm"]["after_step"], after_step, "sync-batchnorm")
