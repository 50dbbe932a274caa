"""Cost-aware SNL vs count-only SNL, layer culling and the original, under CrypTen.

small_resnet / Fashion-MNIST (one pretrained model and one data split for every method, best
fine-tune epoch on the validation split): test accuracy against the predicted CrypTen latency
(``snl_fx.pi_cost``) at WAN and LAN, and against the measured one (``snl_fx.pi_bench`` on the
``pi`` export: measured bytes, rounds and local seconds; latency = local seconds + the network
model). Rows:

* ``original``;
* ``snl-count``: ``linearize`` to ``--fraction`` of the ReLUs (count-only SNL); its predicted
  WAN latency L sets the cost budget of the others: ``Cost(seconds=L / --speedup)``;
* ``cost-group`` / ``cost-drop``: ``linearize`` with that Cost (the two gate-phase
  formulations); ``cost-*-unmerged`` is the same model before ``merge_linear``;
* ``culling``: DeepReDuce-style whole layers, most critical first (``pareto.stage_culling_scores``),
  selected to the same Cost by ``CostPlan.select``, fine-tuned for gate + fine-tune epochs.

cifar_resnet18 (random weights, cost only): bytes and rounds of count-only (one-shot scores) at
15K and 50K ReLUs, and of cost-aware (same scores) and culling selections to a Cost whose part
above the linear layers' cost is the count-only one's / speedup (the linear layers alone cost more
than count-only / 1.5 on a WAN).

    OMP_NUM_THREADS=1 nice -n 15 python benchmarks/cost_aware.py --quick --out benchmarks/results/cost-aware-quick
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

import snl_fx
from snl_fx.app import jobs
from snl_fx.app.data import split_train_val

sys.path.insert(0, str(Path(__file__).parent))
from pareto import site_criticality, stage_culling_scores  # noqa: E402


def costs(model: torch.nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Predicted CrypTen bytes, rounds, WAN and LAN seconds of one sample."""
    wan, lan = (snl_fx.pi_cost(model, x[:1], "crypten", n) for n in ("wan", "lan"))
    return {"bytes": wan.bytes, "rounds": wan.rounds, "wan_s": wan.seconds, "lan_s": lan.seconds,
            "relus": snl_fx.relu_count(model, x[:1]).total}


def measured(model: torch.nn.Module, x: torch.Tensor, runs: int) -> dict[str, Any]:
    """CrypTen 2PC on loopback: measured bytes, rounds, local seconds; latency with the network model."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        snl_fx.export_onnx(model.cpu().eval(), x[:1].cpu(), path, profile="pi")
        r = snl_fx.pi_bench(str(path), runs=runs)
    out = {"m_bytes": r.bytes, "m_rounds": r.rounds, "m_local_s": r.seconds, "m_relus": r.relus}
    for name in ("wan", "lan"):
        network = snl_fx.pi_cost(model, x[:1], "crypten", name).network
        out[f"m_{name}_s"] = r.seconds + network.seconds(r.bytes, r.rounds)
    return out


def small_resnet_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    cfg = snl_fx.TrainConfig(epochs=args.epochs, finetune_epochs=args.finetune_epochs, seed=0, progress=False)
    torch.manual_seed(0)
    train, test = jobs.load_datasets("fashion-mnist", subset=args.subset, seed=0)
    fit, val = split_train_val(train, 0.1, seed=0)
    model = jobs.build_model("small_resnet", "fashion-mnist")
    jobs.pretrain(model, fit, val, cfg, args.pretrain_epochs, cache_dir=args.out,
                  cache_key={"model": "small_resnet", "subset": args.subset, "epochs": args.pretrain_epochs})
    model.cpu().eval()
    x = next(iter(torch.utils.data.DataLoader(fit, batch_size=32)))[0]
    rows = []

    def add(method: str, m: torch.nn.Module, val_acc: float | None, seconds: float, **extra: Any) -> None:
        row = {"method": method, "test_acc": snl_fx.evaluate(m, test, cfg), "val_acc": val_acc, **costs(m, x),
               "seconds": seconds, **extra}
        if args.measure:
            row.update(measured(m, x, args.runs))
        logging.info("%s", json.dumps(row))
        rows.append(row)

    add("original", model, snl_fx.evaluate(model, val, cfg), 0.0)
    start = time.perf_counter()
    count = snl_fx.linearize(model, x, args.fraction, fit, val_data=val, config=cfg)
    add("snl-count", count.model, count.accuracy_after, time.perf_counter() - start)
    target = snl_fx.Cost(seconds=rows[-1]["wan_s"] / args.speedup)
    for penalty in ("group", "drop"):
        start = time.perf_counter()
        r = snl_fx.linearize(model, x, replace(target, penalty=penalty), fit, val_data=val, config=cfg)
        add(f"cost-{penalty}", r.model, r.accuracy_after, time.perf_counter() - start, merged_ops=r.cost["merged_ops"],
            sites_kept=sum(1 for s in r.sites.values() if s["after"]))
        add(f"cost-{penalty}-unmerged", snl_fx.convert(r.gated).eval(), None, 0.0)
    start = time.perf_counter()
    gm = snl_fx.prepare(model, x)
    plan = snl_fx.plan_cost(target, model, x, gm)
    plan.select(gm, scores=stage_culling_scores(gm, site_criticality(gm, val, cfg), plan.relu_ceiling()))
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    snl_fx.finetune(gm, teacher, fit, replace(cfg, finetune_epochs=cfg.epochs + cfg.finetune_epochs), val_data=val)
    culled = snl_fx.convert(gm.eval()).eval()
    add("culling", culled, snl_fx.evaluate(culled, val, cfg), time.perf_counter() - start,
        sites_kept=sum(1 for v in snl_fx.site_relu_counts(gm, 0.5).values() if v))
    return rows


def cifar_rows(speedup: float) -> list[dict[str, Any]]:
    """cifar_resnet18, random weights: cost of each selection at 15K and 50K ReLUs (no training)."""
    from snl_fx.app.models import cifar_resnet18

    torch.manual_seed(0)
    model = cifar_resnet18(num_classes=100).eval()
    x = torch.randn(8, 3, 32, 32)
    rows = []
    for budget in (15000, 50000):
        gm = snl_fx.prepare(model, x)
        scores = snl_fx.linearization_scores(gm, x)
        snl_fx.binarize(gm, budget, scores=scores)
        base = costs(snl_fx.convert(gm).eval(), x)
        rows.append({"model": "cifar_resnet18", "budget": budget, "method": "count-only", **base})
        # the linear layers alone may cost more than count-only / speedup: cut the rest by speedup
        fixed = snl_fx.plan_cost(snl_fx.Cost(seconds=base["wan_s"]), model, x, snl_fx.prepare(model, x)).base
        target = snl_fx.Cost(seconds=fixed + (base["wan_s"] - fixed) / speedup)
        for method in ("cost-aware", "culling"):
            gm = snl_fx.prepare(model, x)
            plan = snl_fx.plan_cost(target, model, x, gm)
            if method == "culling":
                crit = {n: float(s.sum()) for n, s in scores.items()}
                plan.select(gm, scores=stage_culling_scores(gm, crit, plan.relu_ceiling()))
            else:
                plan.select(gm, scores=scores)
            rows.append({"model": "cifar_resnet18", "budget": budget, "method": method, "cost_budget_wan_s": target.limit,
                         **costs(snl_fx.convert(gm).eval(), x)})
        logging.info("%s", json.dumps(rows[-3:]))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="5,000 images, 4 pretrain, 3 gate, 2 fine-tune epochs")
    p.add_argument("--out", default="benchmarks/results/cost-aware")
    p.add_argument("--fraction", type=float, default=0.05, help="count-only SNL budget (fraction of the ReLUs)")
    p.add_argument("--speedup", type=float, default=1.5, help="cost budget = count-only WAN latency / speedup")
    p.add_argument("--measure", action="store_true", help="also run each model under CrypTen (pi_bench)")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--cifar-only", action="store_true", help="only the cifar_resnet18 cost rows")
    args = p.parse_args(argv)
    args.subset, args.pretrain_epochs, args.epochs, args.finetune_epochs = (5000, 4, 3, 2) if args.quick else (None, 8, 8, 8)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = {"small_resnet": [] if args.cifar_only else small_resnet_rows(args), "cifar_resnet18": cifar_rows(args.speedup),
            "args": vars(args)}
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
