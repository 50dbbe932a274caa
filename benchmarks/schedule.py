"""Lambda schedules compared: the paper's Algorithm 1 vs the budget-aware one.

Same pretrained small ResNet on Fashion-MNIST, same budget, same lambda0/kappa/lr, same epoch
limit, same fine-tune; only ``schedule`` differs. Reports, per schedule, the gate epoch at which
the count met the budget (or the count at the limit), and test accuracy after fine-tuning.

    python benchmarks/schedule.py --out runs/schedule [--subset 10000] [--epochs 30]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import snl_fx
from snl_fx.app import jobs
from snl_fx.app.data import split_train_val


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/schedule")
    parser.add_argument("--subset", type=int, default=10000, help="training images (a fixed random sample)")
    parser.add_argument("--budget", type=float, default=0.05)
    parser.add_argument("--epochs", type=int, default=30, help="gate-phase epoch limit")
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--pretrain-epochs", type=int, default=4)
    parser.add_argument("--lambda0", type=float, default=1e-5, help="the paper's value")
    parser.add_argument("--kappa", type=float, default=1.1, help="the paper's value")
    parser.add_argument("--schedules", default="budget,paper")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(args.seed)
    train, test = jobs.load_datasets("fashion-mnist", subset=args.subset, seed=args.seed)
    fit, val = split_train_val(train, 0.1, seed=args.seed)
    base = snl_fx.TrainConfig(epochs=args.epochs, finetune_epochs=args.finetune_epochs, lambda0=args.lambda0,
                              kappa=args.kappa, seed=args.seed, progress=False)
    model = jobs.build_model("small_resnet", "fashion-mnist")
    jobs.pretrain(model, fit, val, base, args.pretrain_epochs, cache_dir=out,
                  cache_key={"model": "small_resnet", "data": "fashion-mnist", "subset": args.subset})
    model.cpu().eval()
    example = torch.stack([fit[i][0] for i in range(32)])
    acc_before = snl_fx.train.evaluate(model, test, base)
    print(f"pretrained: test acc {acc_before:.2f}%")

    rows = []
    for schedule in args.schedules.split(","):
        start = time.perf_counter()
        opts = {**vars(base), "schedule": schedule}
        result = snl_fx.linearize(model, example, args.budget, fit, val_data=val, **opts)
        gates = [h for h in result.history if h["phase"] == "gates"]
        reached = next((h["epoch"] for h in gates if h["relu_count"] <= result.budget), None)
        row = {
            "schedule": schedule, "budget": result.budget, "epochs_to_budget": reached,
            "gate_epochs_run": len(gates), "count_at_end_of_gates": gates[-1]["relu_count"],
            "final_relus": result.relu_count, "final_lambda": gates[-1]["lambda"],
            "test_acc": snl_fx.train.evaluate(result.model, test, base), "seconds": time.perf_counter() - start,
            "counts": [h["relu_count"] for h in gates], "lambdas": [h["lambda"] for h in gates],
        }
        rows.append(row)
        print(f"{schedule:7s}: budget {row['budget']:,} reached at gate epoch {reached}, "
              f"count after gates {row['count_at_end_of_gates']:,}, final {row['final_relus']:,}, "
              f"test acc {row['test_acc']:.2f}% ({row['seconds']:.0f} s)", flush=True)
    (out / "schedule.json").write_text(json.dumps({"args": vars(args), "test_acc_before": acc_before, "rows": rows},
                                                  indent=2) + "\n")


if __name__ == "__main__":
    main()
