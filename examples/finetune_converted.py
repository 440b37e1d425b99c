"""Fine-tune a trained model after converting it to KernelWarehouse, then save, load and export it.

An ordinary PyTorch loop; the only KernelWarehouse-specific lines are marked ``# KW``.

    python examples/finetune_converted.py                                  # stand-in weights, synthetic data
    python examples/finetune_converted.py --weights trained.safetensors --budget 0.5 --steps 2000
    python examples/finetune_converted.py --model mypkg.models:build_net --input-size 3,32,32

Replace ``batches()`` by your DataLoader.  Without ``--weights`` the model has random weights
(nothing is downloaded), which shows the mechanics but not the accuracy; the README's
"Fine-tuning a converted model" has the measured numbers.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

import kwconvert
from kwconvert.models import build_model, canonical_source, load_weights
from kwconvert.training import FINE_TUNE, parameter_groups


def batches(batch_size: int, input_size: tuple[int, ...], classes: int, seed: int = 0):
    """Synthetic labelled images, forever: stands in for your training DataLoader."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield (torch.randn(batch_size, *input_size, generator=generator),
               torch.randint(0, classes, (batch_size,), generator=generator))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18",
                        help="a torchvision model name, timm:NAME or pkg.module:callable (as the CLI takes)")
    parser.add_argument("--weights", type=Path, help="the trained model's state dict (.safetensors, .pt)")
    parser.add_argument("--input-size", default="3,64,64", help="C,H,W of one image")
    parser.add_argument("--budget", default="1", help="KernelWarehouse budget b, e.g. 1, 0.5, 1/2")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.01, help="the lr you would fine-tune the original with")
    parser.add_argument("--out", type=Path, default=Path("kwconvert-out/finetuned"))
    args = parser.parse_args(argv)
    input_size = tuple(int(size) for size in args.input_size.split(","))

    source = canonical_source(args.model)
    model = build_model(source).eval()
    if args.weights:
        load_weights(model, args.weights)
    with torch.no_grad():
        classes = model(torch.zeros(1, *input_size)).shape[-1]

    # KW: convert, keeping the trained function (init="preserve" is the default) at every tau.
    model = kwconvert.convert(model.eval(), kwconvert.parse_budget(args.budget),
                              example_inputs=(torch.zeros(1, *input_size),))
    kwconvert.set_temperature(model, FINE_TUNE.temperature)  # KW: no annealing from a trained model

    # KW: the cells and the attention get learning rates of their own (FINE_TUNE's scales).
    optimizer = torch.optim.SGD(parameter_groups(model, args.lr, weight_decay=5e-4),
                                lr=args.lr, momentum=0.9, nesterov=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / args.steps)))
    model.train()
    for step, (images, labels) in zip(range(args.steps), batches(args.batch_size, input_size, classes)):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step + 1}/{args.steps}  loss {loss.item():.4f}", flush=True)

    # KW: save (safetensors + plan JSON), load it back, export to ONNX with a dynamic batch.
    model.eval()
    kwconvert.save(model, args.out, source=source, input_size=input_size)
    loaded = kwconvert.load(args.out).eval()
    x = torch.randn(2, *input_size)
    with torch.no_grad():
        print(f"saved to {args.out}; loaded back, max |diff| {(loaded(x) - model(x)).abs().max():.2g}")
    report = kwconvert.export(loaded, args.out.with_suffix(".onnx"))  # needs the "export" extra
    print(f"exported {report.path}, checked in onnxruntime: max |diff| {max(report.max_abs_diff.values()):.2g}")


if __name__ == "__main__":
    main()
