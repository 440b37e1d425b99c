"""Train a KernelWarehouse model from scratch with the paper's temperature schedule, resumably;
then save, load and export it.

An ordinary PyTorch loop; the KernelWarehouse-specific lines are marked ``# KW``.

    python examples/train_from_scratch.py                                   # resnet18, synthetic data
    python examples/train_from_scratch.py --steps 2000 --checkpoint run.pt   # resumable: run it again after a kill
    python examples/train_from_scratch.py --model mypkg.models:build_net --input-size 3,32,32

Replace ``batch_at()`` by your DataLoader.  The paper (Sec. 3.3) anneals the attention's
temperature tau from 1 to 0 over the first 10 % of training; ``TemperatureScheduler`` does
it per iteration and, like the LR scheduler, goes into the checkpoint, so a resumed run
continues the schedule instead of restarting at tau = 1.  To fine-tune a model you have
already trained, see ``finetune_converted.py`` (no annealing needed there).
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

import kwconvert
from kwconvert.models import build_model, canonical_source
from kwconvert.training import TemperatureScheduler, parameter_groups


def batch_at(step: int, batch_size: int, input_size: tuple[int, ...], classes: int):
    """Synthetic labelled images, the same for a step in every run: stands in for your DataLoader."""
    generator = torch.Generator().manual_seed(step)
    return (torch.randn(batch_size, *input_size, generator=generator),
            torch.randint(0, classes, (batch_size,), generator=generator))


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temporary file, then rename: a kill never leaves half a checkpoint."""
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18",
                        help="a torchvision model name, timm:NAME or pkg.module:callable (as the CLI takes)")
    parser.add_argument("--input-size", default="3,32,32", help="C,H,W of one image")
    parser.add_argument("--budget", default="1", help="KernelWarehouse budget b, e.g. 1, 0.5, 4")
    parser.add_argument("--steps", type=int, default=200, help="iterations of the whole run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--checkpoint", type=Path, help="resume from this file if it exists; write it every --every steps")
    parser.add_argument("--every", type=int, default=50, help="steps between checkpoints")
    parser.add_argument("--stop-after", type=int, help="stop after this step (to try resuming)")
    parser.add_argument("--out", type=Path, default=Path("kwconvert-out/trained"))
    args = parser.parse_args(argv)
    input_size = tuple(int(size) for size in args.input_size.split(","))

    torch.manual_seed(0)
    source = canonical_source(args.model)
    model = build_model(source)
    with torch.no_grad():
        classes = model.eval()(torch.zeros(1, *input_size)).shape[-1]

    # KW: convert with the paper's from-scratch initialisation (no trained kernels to keep).
    model = kwconvert.convert(model, kwconvert.parse_budget(args.budget), init="random",
                              example_inputs=(torch.zeros(1, *input_size),))
    # KW: one learning rate for every parameter, decay on kernels and projections only (the
    # reference implementation's groups).
    optimizer = torch.optim.SGD(parameter_groups(model, args.lr, weight_decay=5e-4, cell_lr_scale=1.0,
                                                 attention_lr_scale=1.0), lr=args.lr, momentum=0.9)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / args.steps)))
    # KW: tau from 1 to 0 over the first 10 % of the iterations (Sec. 3.3), set on every KW layer.
    temperature = TemperatureScheduler(model, warmup_steps=max(1, args.steps // 10))

    first = 0
    if args.checkpoint and args.checkpoint.is_file():
        state = torch.load(args.checkpoint, weights_only=True)  # tensors and numbers only: nothing unpickled
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
        temperature.load_state_dict(state["temperature"])  # KW: continue the schedule, not restart it
        first = state["step"]
        print(f"resumed at step {first} (tau {temperature.tau:.3f})", flush=True)

    model.train()
    for step in range(first, args.steps):
        images, labels = batch_at(step, args.batch_size, input_size, classes)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        print(f"step {step + 1}/{args.steps}  tau {temperature.tau:.3f}  loss {loss.item():.5f}", flush=True)
        lr_schedule.step()
        temperature.step()  # KW
        done = step + 1
        if args.checkpoint and (done % args.every == 0 or done == args.stop_after):
            save_checkpoint(args.checkpoint, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                              "lr_schedule": lr_schedule.state_dict(),
                                              "temperature": temperature.state_dict(), "step": done})
        if done == args.stop_after:
            print(f"stopped after step {done}", flush=True)
            return

    # KW: save (safetensors + plan JSON, each layer's tau), load it back, export with a dynamic batch.
    model.eval()
    kwconvert.save(model, args.out, source=source, input_size=input_size)
    loaded = kwconvert.load(args.out).eval()
    x = torch.randn(2, *input_size)
    with torch.no_grad():
        print(f"saved to {args.out}; loaded back, max |diff| {(loaded(x) - model(x)).abs().max():.2g}")
    report = kwconvert.export(loaded, args.out.with_suffix(".pt2"), format="torch_export")
    print(f"exported {report.path}, checked with torch.export.load: max |diff| {max(report.max_abs_diff.values()):.2g}")


if __name__ == "__main__":
    main()
