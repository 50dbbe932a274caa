"""Linearize the zoo ViT on Fashion-MNIST: snl_fx's per-family budgets against uniform replacements (issue 19).

Stages (each resumable: results go to ``--out``, one JSON line per finished row):

* ``pretrain``: ``vit_tiny_fm`` with AdamW and a cosine schedule, until the validation accuracy
  stops rising (``--patience`` epochs without a new best), the best epoch kept. Train 55,000 /
  validation 5,000 images of the training set (seeded split), test = the 10,000 test images.
* ``run``: from the pretrained model, every method gets the same epochs (gate phase + KD
  fine-tune, or KD fine-tune alone for the uniform replacements and the control), the best
  epoch on validation kept, the test accuracy reported once, and the predicted SPU cost.
* ``measure``: each row's model exported (profile pi) and run under SPU (``--backend``).
* ``table``: the results as a Markdown table, priced with this checkout's cost tables (``--plot``).

Example:
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/vit_linearize.py pretrain --out benchmarks/results/vit
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/vit_linearize.py run --out benchmarks/results/vit
    .venv/bin/python benchmarks/vit_linearize.py table --out benchmarks/results/vit
"""

from __future__ import annotations

import argparse
import copy
import json
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


# name -> (kind, settings). "snl": snl_fx.linearize with the budget; "uniform": every unit of the families
# closed (their replacement everywhere) or open ("control"), then the same KD fine-tune for all the epochs.
METHODS = {
    "control": ("uniform", {"families": ("gelu", "softmax"), "keep": True}),
    "uniform identity+square": ("uniform", {"families": ("gelu", "softmax"), "replacements": {"softmax": "square"}}),
    "uniform identity+relu-softmax": ("uniform", {"families": ("gelu", "softmax"), "replacements": {"softmax": "relu"}}),
    "uniform identity+2quad": ("uniform", {"families": ("gelu", "softmax"), "replacements": {"softmax": "quad"}}),
    "uniform identity+scaled": ("uniform", {"families": ("gelu", "softmax"), "replacements": {"softmax": "scaled"}}),
    "uniform softmax square (GELU kept)": ("uniform", {"families": ("softmax",), "replacements": {"softmax": "square"}}),
    "snl_fx gelu=10%,softmax=10%": ("snl", {"budget": {"gelu": 0.1, "softmax": 0.1}}),
    "snl_fx gelu=25%,softmax=25%": ("snl", {"budget": {"gelu": 0.25, "softmax": 0.25}}),
    "snl_fx gelu=50%,softmax=10%": ("snl", {"budget": {"gelu": 0.5, "softmax": 0.1}}),
    "PriViT recipe gelu=10%,softmax=10%": ("snl", {"budget": {"gelu": 0.1, "softmax": 0.1}, "schedule": "paper",
                                                    "kappa": 1.1}),
    "MPCViT-style 50% heads (scaled attention)": ("snl", {"budget": {"softmax": 0.5}, "units": {"softmax": "head"},
                                                           "replacements": {"softmax": "scaled"}}),
    **{f"snl_fx Cost {label} CHEETAH bytes ({'sites first' if penalty == 'sites' else 'gate penalty'})":
       ("snl", {"cost_share": share, "penalty": penalty})
       for penalty in ("group", "sites") for label, share in (("0.7", 0.7), ("1/2", 0.5), ("1/2.5", 0.4), ("0.35", 0.35))},
    "snl_fx Cost 1/2 CHEETAH bytes, relu-softmax (gate penalty)": ("snl", {"cost_share": 1 / 2, "penalty": "group",
                                                                          "replacements": {"softmax": "relu"}}),
}


def run(args: argparse.Namespace) -> None:
    import snl_fx
    from snl_fx.gated import convert, freeze_gates, gates, prepare

    out = Path(args.out)
    results_path = out / "results.jsonl"
    done = {json.loads(line)["method"] for line in results_path.open()} if results_path.exists() else set()
    train, val, test = splits()
    g = torch.Generator().manual_seed(args.seed)
    train = Subset(train, sorted(torch.randperm(len(train), generator=g)[: args.train_subset].tolist()))
    teacher = vit_tiny_fm()
    teacher.load_state_dict(torch.load(out / "pretrained.pt", weights_only=True))
    teacher.eval()
    x = torch.stack([train[i][0] for i in range(8)])
    total = args.gate_epochs + args.finetune_epochs
    full = snl_fx.pi_cost(teacher, x[:1], protocol=args.protocol)
    for name in args.methods or list(METHODS):
        if name in done:
            continue
        kind, spec = METHODS[name]
        torch.manual_seed(args.seed)
        t0 = time.time()
        model = copy.deepcopy(teacher)
        if kind == "uniform":
            cfg = snl_fx.TrainConfig(finetune_epochs=total, seed=args.seed, batch_size=128, progress=False)
            gm = prepare(model, x, families=spec["families"], replacements=spec.get("replacements"))
            for gate in gates(gm).values():
                with torch.no_grad():
                    gate.weight.fill_(1.0 if spec.get("keep") else 0.0)
            freeze_gates(gm)
            history = snl_fx.finetune(gm, teacher, train, cfg, val_data=val)
            lowered = convert(gm).eval()
        else:
            budget = spec.get("budget")
            if "cost_share" in spec:
                budget = snl_fx.Cost(bytes=full.bytes * spec["cost_share"], protocol=args.protocol,
                                     families=("gelu", "softmax"), penalty=spec["penalty"])
            cfg = snl_fx.TrainConfig(epochs=args.gate_epochs, finetune_epochs=args.finetune_epochs, seed=args.seed,
                                     batch_size=128, progress=False,
                                     **{k: spec[k] for k in ("schedule", "kappa") if k in spec})
            result = snl_fx.linearize(model, x, budget, train, val_data=val, config=cfg, units=spec.get("units"),
                                      replacements=spec.get("replacements"))
            lowered, history = result.model.eval(), result.history
        report = snl_fx.relu_count(lowered, x[:1])
        costs = {p: snl_fx.pi_cost(report, protocol=p) for p in ("spu-cheetah", "spu-semi2k")}
        row = {"method": name, "test_acc": accuracy(lowered, test), "val_acc": accuracy(lowered, val),
               "epochs": total, "seconds": time.time() - t0,
               "gelu": report.family_count("gelu"), "softmax": report.family_count("softmax"),
               "val_by_epoch": [h.get("val_acc") for h in history],
               **{f"{p}_{k}": getattr(c, k) for p, c in costs.items() for k in ("bytes", "rounds", "seconds")},
               **{f"{p}_complete": c.complete for p, c in costs.items()}}
        with results_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        torch.save(lowered, out / f"model-{slug(name)}.pt")  # for pricing and measuring later
        print(json.dumps(row), flush=True)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").open()]


def load_model(out: Path, method: str) -> nn.Module:
    """A saved row's lowered model (rows saved before PartialNonlinear took ``row`` get it from their shape)."""
    from snl_fx.passes import PartialNonlinear

    model = torch.load(out / f"model-{slug(method)}.pt", weights_only=False)
    for m in model.modules():
        if isinstance(m, PartialNonlinear) and not hasattr(m, "row"):
            m.row = m.inner[-1] if m.inner else 1
    return model


def price(args: argparse.Namespace) -> dict[str, dict]:
    """Predicted SPU costs of every saved model, with the cost tables of this checkout."""
    import snl_fx

    x = torch.zeros(1, 1, 28, 28)
    priced = {}
    for r in _rows(Path(args.out)):
        model = load_model(Path(args.out), r["method"])
        report = snl_fx.relu_count(model, x)
        priced[r["method"]] = {p: snl_fx.pi_cost(report, protocol=p) for p in ("spu-cheetah", "spu-semi2k")}
    return priced


def measure(args: argparse.Namespace) -> None:
    """Export every saved model (profile pi) and run it under SPU (``--backend``); one JSON line each."""
    import snl_fx

    out = Path(args.out)
    path = out / f"measured-{args.backend}.jsonl"
    done = {json.loads(line)["method"] for line in path.open()} if path.exists() else set()
    x = torch.zeros(1, 1, 28, 28)
    for r in _rows(out):
        if r["method"] in done or (args.methods and r["method"] not in args.methods):
            continue
        model = load_model(out, r["method"])
        onnx_path = out / f"model-{slug(r['method'])}.onnx"
        snl_fx.export_onnx(model, x, onnx_path, profile="pi")
        bench = snl_fx.pi_bench(onnx_path, backend=args.backend, runs=1)
        row = {"method": r["method"], "bytes": bench.bytes, "rounds": bench.rounds, "seconds": bench.seconds,
               "max_abs_error": bench.max_abs_error}
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def table(args: argparse.Namespace) -> None:
    from snl_fx.cost import parse_network

    out = Path(args.out)
    priced = price(args)
    wan = parse_network("wan")
    measured = {}
    path = out / "measured-spu-cheetah.jsonl"
    if path.exists():
        measured = {json.loads(line)["method"]: json.loads(line) for line in path.open()}
    print("| method | test acc | best val acc | GELU elements | softmax elements | CHEETAH MB predicted | measured "
          "| CHEETAH rounds | WAN s (predicted) | SEMI2K MB predicted |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in _rows(out):
        c, s2 = priced[r["method"]]["spu-cheetah"], priced[r["method"]]["spu-semi2k"]
        m = measured.get(r["method"])
        meas = f"{m['bytes'] / 1e6:.1f}" if m else "-"
        print(f"| {r['method']} | {r['test_acc']:.2f}% | {r['val_acc']:.2f}% | {r['gelu']:,} | {r['softmax']:,} | "
              f"{c.bytes / 1e6:.1f}{'' if c.complete else ' (at least)'} | {meas} | {c.rounds} | "
              f"{c.compute_seconds + wan.seconds(c.bytes, c.rounds or 0):.2f} | {s2.bytes / 1e6:.2f} |")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 5))
        colors = plt.get_cmap("tab20").colors
        for i, r in enumerate(_rows(out)):
            c = priced[r["method"]]["spu-cheetah"]
            marker = "o" if r["method"].startswith("snl_fx") else "s" if r["method"].startswith("uniform") else "^"
            ax.scatter(c.bytes / 1e6, r["test_acc"], marker=marker, label=r["method"], color=colors[i % len(colors)])
            if r["method"] in measured:
                ax.scatter(measured[r["method"]]["bytes"] / 1e6, r["test_acc"], marker="x", color="k")
        ax.set_xlabel("SPU CHEETAH MB per image (markers: predicted; x: measured)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(84, 90)  # uniform ReLU-softmax (75%) is off the chart
        ax.set_title("vit_tiny_fm on Fashion-MNIST: accuracy against CHEETAH traffic")
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "vit_accuracy_vs_cheetah.png", dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["pretrain", "run", "measure", "table"])
    p.add_argument("--backend", default="spu-cheetah", help="measure: the SPU protocol run")
    p.add_argument("--plot", action="store_true", help="table: also write vit_accuracy_vs_cheetah.png")
    p.add_argument("--methods", nargs="*", help="rows to run (default all; finished rows are skipped)")
    p.add_argument("--gate-epochs", type=int, default=4)
    p.add_argument("--finetune-epochs", type=int, default=4)
    p.add_argument("--train-subset", type=int, default=20000, help="training images for linearization")
    p.add_argument("--protocol", default="spu-cheetah", help="of the Cost rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/vit")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-epochs", type=int, default=40)
    p.add_argument("--patience", type=int, default=3)
    args = p.parse_args()
    {"pretrain": pretrain, "run": run, "measure": measure, "table": table}[args.stage](args)


if __name__ == "__main__":
    main()
