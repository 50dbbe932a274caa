"""The SNL pieces driven from your own training loop (no ``linearize``), on a Fashion-MNIST subset.

prepare -> train with lasso_penalty and a LambdaSchedule -> binarize -> fine-tune -> convert ->
export_onnx. About a minute on 2 CPU cores:

    python examples/own_training_loop.py [--budget 2000] [--out runs/own_loop]
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import snl_fx
from snl_fx.app import jobs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=2000, help="ReLUs per sample to keep")
    parser.add_argument("--epochs", type=int, default=6, help="gate-phase epoch limit")
    parser.add_argument("--data-root", help="folder of the Fashion-MNIST idx files (default: Debian's)")
    parser.add_argument("--out", default="runs/own_loop")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    train, test = jobs.load_datasets("fashion-mnist", args.data_root, subset=5000)
    loader = DataLoader(train, batch_size=128, shuffle=True)

    # 1. a model to linearize (here: two quick epochs of plain training)
    model = jobs.build_model("small_resnet", "fashion-mnist")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step()
    model.eval()
    teacher = copy.deepcopy(model).requires_grad_(False)
    example = next(iter(loader))[0][:16]

    # 2. gates at every ReLU site, then Algorithm 1 with your loss
    gm = snl_fx.prepare(model, example, granularity="pixel")
    total = snl_fx.train.relu_count_gated(gm)
    schedule = snl_fx.train.LambdaSchedule(lam=1e-5, budget=args.budget, lowest=total,
                                     total_steps=args.epochs * len(loader))  # "target": lambda steered every step
    gate_ids = {id(p) for p in snl_fx.train.gate_parameters(gm)}
    weights = [p for p in gm.parameters() if id(p) not in gate_ids]
    opt = torch.optim.Adam([{"params": weights}, {"params": snl_fx.train.gate_parameters(gm), "lr": 3 / len(loader) / args.epochs}],
                           lr=1e-3)  # gate lr: a gate can cross 0..1 in a third of the steps
    cfg = snl_fx.TrainConfig()  # evaluate's device and batch size
    for epoch in range(1, args.epochs + 1):
        gm.train()
        for x, y in loader:
            with torch.no_grad():
                target = teacher(x)
            loss = snl_fx.train.kd_loss(gm(x), target, y, temperature=4.0, weight=0.5) + schedule.lam * snl_fx.train.lasso_penalty(gm)
            opt.zero_grad(); loss.backward(); opt.step()
            snl_fx.train.clamp_gates(gm)
            count = snl_fx.train.relu_count_gated(gm, eps=0.01)
            schedule.after_step(count, snl_fx.train.soft_relu_count(gm))
            if count <= args.budget:
                break  # checked every step: many gates can cross eps within one epoch
        count = snl_fx.train.relu_count_gated(gm, eps=0.01)
        print(f"epoch {epoch}: {count:,} ReLUs (lambda {schedule.lam:.2g})")
        schedule.step(count, epoch)
        if count <= args.budget:
            break

    # 3. exactly the budget, gates frozen; fine-tune the weights (linearize's own fine-tune phase)
    final = snl_fx.binarize(gm, args.budget)
    snl_fx.finetune(gm, teacher, train, snl_fx.TrainConfig(finetune_epochs=1, progress=False))

    # 4. lower to a static graph and export
    lowered = snl_fx.convert(gm.eval())
    exported = snl_fx.export_onnx(lowered, example[:1], Path(args.out) / "model.onnx")
    print(f"kept {final:,} of {total:,} ReLUs; test acc {snl_fx.train.evaluate(model, test, cfg):.2f}% -> "
          f"{snl_fx.train.evaluate(lowered, test, cfg):.2f}%; {exported.path} has {exported.relu_count:,} ReLUs")


if __name__ == "__main__":
    main()
