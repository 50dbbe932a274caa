"""Accuracy vs. ReLU budget: SNL (pixel, channel) against baselines, on Fashion-MNIST.

Every method starts from the same pretrained small ResNet (43,904 ReLUs per sample), uses the
same data split (fit / validation / test), and ends with the same fine-tune (mask frozen, SGD
with knowledge distillation from the original model, best epoch on the validation split).
Methods differ only in how the kept ReLUs are chosen:

* ``snl-pixel`` / ``snl-channel``: ``snl_fx.linearize`` (gates trained with the Lasso penalty
  until the count meets the budget, then binarized and fine-tuned);
* ``stage-culling`` (DeepReDuce-style): whole ReLU layers kept, most critical first, criticality
  = validation accuracy drop when that layer alone is linearized; the budget left over goes to
  the most critical layer that did not fit whole, as a prefix of its elements (whole channels
  in channel order, then part of one channel);
* ``l1-prune`` (structured pruning, Li et al. 2017): channels ranked within each ReLU layer by
  the l1 norm of the filter of the convolution feeding it, the same top fraction kept in every
  layer (greedily packed up to the budget); a pruned channel is zeroed after the site (so it
  needs no ReLU: relu(0) = 0) and stays zero while fine-tuning; count <= budget;
* ``random``: a uniformly random set of pixels;
* ``one-shot``: ``snl_fx.select.linearization_scores`` on a batch of training images (training-free).

Baselines have no gate phase, so they get the SNL gate-phase epochs as extra fine-tune epochs:
every method trains for ``gate_epochs + finetune_epochs`` epochs. All training settings are
the library's defaults (``snl_fx.TrainConfig``); the baselines use ``snl_fx.finetune``, the
fine-tune of ``linearize``.

    python benchmarks/pareto.py --quick --out benchmarks/results/pareto-quick
    python benchmarks/pareto.py --out benchmarks/results/pareto

Writes ``results.csv``, ``results.json`` (resumable: finished rows are skipped) and ``pareto.png``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.fx import GraphModule
from torch.utils.data import Dataset, Subset

import snl_fx
from snl_fx.app import jobs
from snl_fx.app.data import split_train_val
from snl_fx.app.plots import plot_accuracy_vs_relus

METHODS = ("snl-pixel", "snl-channel", "stage-culling", "l1-prune", "random", "one-shot")
BASELINES = ("stage-culling", "l1-prune", "random", "one-shot")
FULL_FRACTIONS = (0.01, 0.02, 0.05, 0.10)
QUICK_FRACTIONS = (0.01, 0.05)
FIELDS = ("method", "granularity", "budget", "budget_fraction", "relu_count", "exact", "test_acc", "val_acc",
          "gate_epochs", "gates_reached", "finetune_epochs", "seconds")


@dataclass
class Setup:
    """What every method shares: the pretrained model, the data split and the training options."""

    model: nn.Module
    fit: Dataset
    val: Dataset
    test: Dataset
    example: torch.Tensor  # batch for tracing
    calib: torch.Tensor  # batch of training images for the one-shot scores
    cfg: snl_fx.TrainConfig


# --------------------------------------------------------------------------- mask choices


def random_scores(gm: GraphModule, seed: int) -> dict[str, torch.Tensor]:
    """Uniform random score per gate element (keeps a random set of pixels)."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(gate.weight.shape, generator=g) for n, gate in snl_fx.train.gates(gm).items()}


def site_criticality(gm: GraphModule, val: Dataset, cfg: snl_fx.TrainConfig) -> dict[str, float]:
    """Validation accuracy drop when one site alone is linearized (all its gates 0), per site."""
    base = snl_fx.train.evaluate(gm, val, cfg)
    drops = {}
    for name, gate in snl_fx.train.gates(gm).items():
        saved = gate.weight.detach().clone()
        with torch.no_grad():
            gate.weight.zero_()
        drops[name] = base - snl_fx.train.evaluate(gm, val, cfg)
        with torch.no_grad():
            gate.weight.copy_(saved)
    return drops


def stage_culling_scores(gm: GraphModule, criticality: dict[str, float], budget: int) -> dict[str, torch.Tensor]:
    """Whole-site scores: sites that fit whole (most critical first) outrank the rest.

    Every element of a site gets the same score, so pixel ``binarize`` keeps whole sites and
    gives what is left of the budget to the most critical site that did not fit whole, as a
    prefix of its elements in (channel, row, column) order (its ties break by element index).
    """
    gates = snl_fx.train.gates(gm)
    order = sorted(gates, key=lambda n: -criticality[n])  # stable: ties keep site order
    left, tier = budget, {}
    for name in order:
        size = gates[name].weight.numel()
        if size <= left:
            tier[name], left = 2.0, left - size
    n = len(order)
    return {name: torch.full(gates[name].weight.shape, tier.get(name, 1.0) + (n - rank) / (n + 1))
            for rank, name in enumerate(order)}


def feeding_conv(gm: GraphModule, site: str) -> nn.Conv2d:
    """The convolution feeding a site: walk back along first inputs (through BN, add) to a Conv2d."""
    modules = dict(gm.named_modules())
    gate = snl_fx.train.gates(gm)[site]
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and modules[n.target] is gate)
    while node.all_input_nodes:
        node = node.all_input_nodes[0]
        if node.op == "call_module" and isinstance(modules[node.target], nn.Conv2d):
            return modules[node.target]
    raise snl_fx.SnlFxError(f"no convolution feeds site {site}")


def l1_filter_scores(gm: GraphModule) -> dict[str, torch.Tensor]:
    """Channel scores: the within-site quantile of the feeding filter's l1 norm (1 = largest).

    Sorting all channels by this quantile keeps about the same top fraction in every site.
    """
    scores = {}
    for name, gate in snl_fx.train.gates(gm).items():
        norms = feeding_conv(gm, name).weight.detach().abs().flatten(1).sum(1)
        if norms.numel() != gate.weight.numel():
            raise snl_fx.SnlFxError(f"site {name}: {gate.weight.numel()} channels, feeding conv has {norms.numel()}")
        ranks = torch.empty_like(norms)
        ranks[torch.argsort(norms, stable=True)] = torch.arange(1, len(norms) + 1, dtype=norms.dtype)
        scores[name] = (ranks / len(norms)).view(gate.weight.shape)
    return scores


def zero_pruned_channels(gm: GraphModule) -> None:
    """Multiply each binarized channel gate's output by the gate: a pruned channel is 0, no ReLU."""
    for gate in snl_fx.train.gates(gm).values():
        gate.register_forward_hook(lambda module, inputs, output: output * module.weight)


# --------------------------------------------------------------------------- training


# --------------------------------------------------------------------------- one row per (method, budget)


def run_snl(setup: Setup, granularity: str, budget: int) -> dict[str, Any]:
    """SNL through the public ``snl_fx.linearize``."""
    cfg = setup.cfg
    result = snl_fx.linearize(setup.model, setup.example, budget, setup.fit, val_data=setup.val,
                              granularity=granularity, config=cfg)
    gate_hist = [h for h in result.history if h["phase"] == "gates"]
    return {"relu_count": result.relu_count, "test_acc": snl_fx.train.evaluate(result.model, setup.test, cfg),
            "val_acc": result.accuracy_after, "gate_epochs": len(gate_hist),
            "gates_reached": bool(gate_hist) and gate_hist[-1]["relu_count"] <= budget,
            "finetune_epochs": cfg.finetune_epochs, "gate_counts": [h["relu_count"] for h in gate_hist]}


def choose_mask(setup: Setup, method: str, budget: int) -> tuple[GraphModule, int]:
    """A prepared gated copy of the model with a binarized, frozen mask chosen by ``method``."""
    granularity = "channel" if method == "l1-prune" else "pixel"
    gm = snl_fx.prepare(setup.model, setup.example, granularity)
    if method == "random":
        scores = random_scores(gm, setup.cfg.seed)
    elif method == "one-shot":
        scores = snl_fx.select.linearization_scores(gm, setup.calib)
    elif method == "stage-culling":
        scores = stage_culling_scores(gm, site_criticality(gm, setup.val, setup.cfg), budget)
    elif method == "l1-prune":
        scores = l1_filter_scores(gm)
    else:
        raise ValueError(f"unknown baseline {method!r}")
    count = snl_fx.binarize(gm, budget, scores=scores)
    if method == "l1-prune":
        zero_pruned_channels(gm)
    return gm, count


def run_baseline(setup: Setup, method: str, budget: int) -> dict[str, Any]:
    """Pick the mask, fine-tune for gate + fine-tune epochs (linearize's fine-tune), evaluate the lowered model."""
    cfg = setup.cfg
    gm, count = choose_mask(setup, method, budget)
    teacher = copy.deepcopy(setup.model).eval().requires_grad_(False)
    epochs = cfg.epochs + cfg.finetune_epochs
    snl_fx.finetune(gm, teacher, setup.fit, replace(cfg, finetune_epochs=epochs), val_data=setup.val)
    gm.eval()
    if method == "l1-prune":  # the zeroing hooks do not survive lowering: evaluate the gated model
        final, model = snl_fx.train.relu_count_gated(gm, eps=0.5), gm
    else:
        model = snl_fx.convert(gm).eval()
        final = snl_fx.relu_count(model, setup.example[:1]).total
    if final != count:
        raise snl_fx.SnlFxError(f"{method}: binarize kept {count} ReLUs but the model has {final}")
    return {"relu_count": final, "test_acc": snl_fx.train.evaluate(model, setup.test, cfg),
            "val_acc": snl_fx.train.evaluate(model, setup.val, cfg), "gate_epochs": 0, "gates_reached": None,
            "finetune_epochs": epochs}


def run_row(setup: Setup, method: str, budget: int, total: int) -> dict[str, Any]:
    """One (method, budget) result; pixel methods must hit the budget exactly."""
    start = time.perf_counter()
    torch.manual_seed(setup.cfg.seed)
    if method.startswith("snl-"):
        row = run_snl(setup, method[4:], budget)
    else:
        row = run_baseline(setup, method, budget)
    granularity = "channel" if method in ("snl-channel", "l1-prune") else "pixel"
    if granularity == "pixel" and row["relu_count"] != budget:
        raise snl_fx.SnlFxError(f"{method}: {row['relu_count']} ReLUs, budget {budget}")
    if row["relu_count"] > budget:
        raise snl_fx.SnlFxError(f"{method}: {row['relu_count']} ReLUs over the budget {budget}")
    return {"method": method, "granularity": granularity, "budget": budget, "budget_fraction": budget / total,
            **row, "exact": row["relu_count"] == budget, "seconds": time.perf_counter() - start}


def run_all(setup: Setup, budgets: Sequence[int], methods: Sequence[str], rows: list[dict[str, Any]],
            total: int, save: Callable[[list[dict[str, Any]]], None] = lambda rows: None) -> list[dict[str, Any]]:
    """Every (method, budget) not already in ``rows``; ``save`` is called after each new row."""
    done = {(r["method"], r["budget"]) for r in rows}
    for budget in budgets:
        for method in methods:
            if (method, budget) in done:
                logging.info("%s @ %d: already done, skipped", method, budget)
                continue
            logging.info("%s @ %d ReLUs (%.1f%%) ...", method, budget, 100 * budget / total)
            row = run_row(setup, method, budget, total)
            logging.info("%s @ %d: %d ReLUs, test acc %.2f%%, %.0f s", method, budget, row["relu_count"],
                         row["test_acc"], row["seconds"])
            rows.append(row)
            save(rows)
    return rows


# --------------------------------------------------------------------------- report


def margins(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Per budget: SNL pixel's test accuracy minus the best baseline's (and which baseline)."""
    out = {}
    for budget in sorted({r["budget"] for r in rows}):
        at = {r["method"]: r["test_acc"] for r in rows if r["budget"] == budget}
        base = {m: a for m, a in at.items() if m in BASELINES}
        if "snl-pixel" in at and base:
            best = max(base, key=base.get)
            out[budget] = {"best_baseline": best, "margin": at["snl-pixel"] - base[best]}
    return out


def table(rows: list[dict[str, Any]], methods: Sequence[str]) -> str:
    """Markdown table: one row per method, one column per budget, 'acc (count)'."""
    budgets = sorted({r["budget"] for r in rows})
    cell = {(r["method"], r["budget"]): f"{r['test_acc']:.2f} ({r['relu_count']:,})" for r in rows}
    lines = ["| method | " + " | ".join(f"{b:,} ({100 * r:.0f}%)" for b, r in
                                           sorted({(r['budget'], r['budget_fraction']) for r in rows})) + " |",
             "|---|" + "---|" * len(budgets)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(cell.get((m, b), "-") for b in budgets) + " |")
    gaps = margins(rows)
    lines.append("| SNL pixel - best baseline | " + " | ".join(
        f"{gaps[b]['margin']:+.2f} ({gaps[b]['best_baseline']})" if b in gaps else "-" for b in budgets) + " |")
    return "\n".join(lines)


def write(out: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """results.json (rows + settings + margins) and results.csv."""
    out.mkdir(parents=True, exist_ok=True)
    doc = {**meta, "rows": rows, "margins": {str(k): v for k, v in margins(rows).items()}}
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot(out: Path, rows: list[dict[str, Any]], reference: tuple[int, float], title: str) -> None:
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        series.setdefault(r["method"], []).append((r["relu_count"], r["test_acc"]))
    plot_accuracy_vs_relus(series, out / "pareto.png", title, reference=reference)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/pareto")
    p.add_argument("--quick", action="store_true", help="data subset, few epochs, two budgets (<= 20 min on 2 cores)")
    p.add_argument("--budgets", type=float, nargs="+", help="fractions of the ReLUs (< 1) or ReLU counts")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--subset", type=int, help="training images (then 10%% of them for validation)")
    p.add_argument("--test-subset", type=int, help="test images (default: all 10,000)")
    p.add_argument("--pretrain-epochs", type=int)
    p.add_argument("--gate-epochs", type=int)
    p.add_argument("--finetune-epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is much faster on a busy shared machine)")
    p.add_argument("--cache-dir", default="runs/pretrained", help="pretrained weights are cached here")
    args = p.parse_args(argv)
    quick = {"subset": 3000, "test_subset": 2000, "pretrain_epochs": 15, "gate_epochs": 4, "finetune_epochs": 2,
             "batch_size": 64}
    full = {"subset": 10000, "test_subset": None, "pretrain_epochs": 15, "gate_epochs": 4, "finetune_epochs": 2,
            "batch_size": 64}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.budgets is None:
        args.budgets = list(QUICK_FRACTIONS if args.quick else FULL_FRACTIONS)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    # the library's defaults; only epochs and batch size are set here
    cfg = snl_fx.TrainConfig(epochs=args.gate_epochs, finetune_epochs=args.finetune_epochs,
                             batch_size=args.batch_size, seed=args.seed, device="cpu", progress=False)
    train, _ = jobs.load_datasets("fashion-mnist", subset=args.subset, seed=args.seed)
    _, test = jobs.load_datasets("fashion-mnist")
    if args.test_subset is not None and args.test_subset < len(test):
        idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(args.seed + 1))[: args.test_subset]
        test = Subset(test, sorted(idx.tolist()))
    fit, val = split_train_val(train, 0.1, seed=args.seed)
    model = jobs.build_model("small_resnet", "fashion-mnist")
    jobs.pretrain(model, fit, val, cfg, args.pretrain_epochs, cache_dir=args.cache_dir,
                  cache_key={"model": "small_resnet", "data": "fashion-mnist", "subset": args.subset,
                             "batch_size": args.batch_size})
    model.cpu().eval()
    example = torch.stack([fit[i][0] for i in range(32)])
    calib = torch.stack([fit[i][0] for i in range(256)])
    total = snl_fx.relu_count(model, example[:1]).total
    budgets = [snl_fx.budget.resolve_budget(b if b < 1 else int(b), total) for b in args.budgets]
    acc_before = snl_fx.train.evaluate(model, test, cfg)
    logging.info("pretrained small ResNet: %d ReLUs, test acc %.2f%%", total, acc_before)

    settings = {k: v for k, v in vars(args).items() if k not in ("out", "budgets", "methods", "cache_dir", "threads")}
    path = out / "results.json"
    rows: list[dict[str, Any]] = []
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("settings") != settings:
            raise SystemExit(f"{path} was made with other settings {old.get('settings')}: use another --out")
        rows = old["rows"]
    meta = {"settings": settings, "relus_before": total, "test_acc_before": acc_before,
            "test_images": len(test), "fit_images": len(fit), "val_images": len(val)}
    setup = Setup(model, fit, val, test, example, calib, cfg)
    run_all(setup, budgets, args.methods, rows, total, save=lambda r: write(out, r, meta))
    meta["seconds_this_run"] = time.perf_counter() - start
    write(out, rows, meta)
    title = f"small ResNet, Fashion-MNIST ({'quick' if args.quick else 'full'})"
    plot(out, rows, (total, acc_before), title)
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    print(f"\noriginal: {total:,} ReLUs, test acc {acc_before:.2f}% on {len(test):,} images\n")
    print(table(rows, methods))
    print(f"\n{out}/results.csv, results.json, pareto.png; wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
