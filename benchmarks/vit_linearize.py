"""Linearize the zoo ViT on Fashion-MNIST: snl_fx's per-family budgets against uniform replacements (issue 19).

Stages (each resumable: results go to ``--out``, one JSON line per finished row):

* ``pretrain``: ``vit_tiny_fm`` with AdamW and a cosine schedule, until the validation accuracy
  stops rising (``--patience`` epochs without a new best), the best epoch kept. Train 55,000 /
  validation 5,000 images of the training set (seeded split), test = the 10,000 test images.
* ``run``: from the pretrained model, every method gets the same epochs (gate phase + KD
  fine-tune, or KD fine-tune alone for the uniform replacements and the control), the best
  epoch on validation kept, the test accuracy reported once.

Example:
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/vit_linearize.py pretrain --out benchmarks/results/vit
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/vit_linearize.py run --out benchmarks/results/vit
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

from snl_fx.app.jobs import load_datasets
from snl_fx.app.models import vit_tiny_fm


def splits(seed: int = 0):
    """(train 55k, validation 5k, test 10k) of Fashion-MNIST, the validation drawn with ``seed``."""
    train, test = load_datasets("fashion-mnist")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(train, sorted(order[5000:])), Subset(train, sorted(order[:5000])), test


@torch.no_grad()
def accuracy(model: nn.Module, data, batch_size: int = 500) -> float:
    model.eval()
    right = total = 0
    for x, y in DataLoader(data, batch_size=batch_size):
        right += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return 100.0 * right / total


def pretrain(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state_path, log_path = out / "pretrain_state.pt", out / "pretrain.jsonl"
    train, val, test = splits()
    torch.manual_seed(0)
    model = vit_tiny_fm()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.max_epochs)
    start, best, best_epoch, best_state = 1, -1.0, 0, None
    if state_path.exists():
        s = torch.load(state_path, weights_only=False)
        model.load_state_dict(s["model"]), opt.load_state_dict(s["opt"]), sched.load_state_dict(s["sched"])
        start, best, best_epoch, best_state = s["epoch"] + 1, s["best"], s["best_epoch"], s["best_state"]
        torch.set_rng_state(s["rng"])
    for epoch in range(start, args.max_epochs + 1):
        if epoch - best_epoch > args.patience:
            break
        t0 = time.time()
        model.train()
        g = torch.Generator().manual_seed(1000 + epoch)
        for x, y in DataLoader(train, batch_size=128, shuffle=True, generator=g):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        acc = accuracy(model, val)
        if acc > best:
            best, best_epoch, best_state = acc, epoch, copy.deepcopy(model.state_dict())
        with log_path.open("a") as f:
            f.write(json.dumps({"epoch": epoch, "val_acc": acc, "seconds": time.time() - t0}) + "\n")
        print(f"pretrain {epoch}: val {acc:.2f}% (best {best:.2f}% at {best_epoch}) {time.time() - t0:.0f}s", flush=True)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "epoch": epoch,
                    "best": best, "best_epoch": best_epoch, "best_state": best_state, "rng": torch.get_rng_state()},
                   state_path)
    model.load_state_dict(best_state)
    torch.save(best_state, out / "pretrained.pt")
    summary = {"best_epoch": best_epoch, "val_acc": best, "test_acc": accuracy(model, test)}
    (out / "pretrained.json").write_text(json.dumps(summary) + "\n")
    print("pretrained:", summary, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["pretrain", "run"])
    p.add_argument("--out", default="benchmarks/results/vit")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-epochs", type=int, default=40)
    p.add_argument("--patience", type=int, default=3)
    args = p.parse_args()
    if args.stage == "pretrain":
        pretrain(args)
    else:
        raise SystemExit("run: not written yet")


if __name__ == "__main__":
    main()
