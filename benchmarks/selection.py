"""Final selection (issue 12 item 2): annealing the gates, and a swap refinement after binarizing.

One pretrained small_resnet (the anchor recipe on a Fashion-MNIST subset), one budget. The gates
are trained once with the library's defaults; then each selection is applied to a copy of the
same trained gates:

* ``threshold``: ``snl_fx.binarize`` (the top gate values; ties by linearization scores);
* ``refine``: the same, then ``snl_fx.select.refine_selection`` (swaps kept and removed ReLUs while the
  measured loss falls);
* ``ramp`` / ``refine-ramp``: the fine-tune's first epoch moves the gates from their soft values
  to the binary ones step by step (``finetune(..., ramp_from=...)``) instead of a jump;

and fine-tuned with the same seed. Recorded: validation accuracy of the soft gates, accuracy
right after the selection (validation and test), and test accuracy of the best fine-tune epoch.

    OMP_NUM_THREADS=1 python benchmarks/selection.py --out runs/selection --budget 0.05
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import snl_fx
from snl_fx.app import jobs
from snl_fx.app.data import split_train_val


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/selection")
    parser.add_argument("--budget", type=float, default=0.05)
    parser.add_argument("--subset", type=int, default=10_000)
    parser.add_argument("--gate-epochs", type=int, default=8)
    parser.add_argument("--finetune-epochs", type=int, default=4)
    parser.add_argument("--selections", default="threshold,ramp,refine", help="comma-separated: threshold, ramp, refine, refine-ramp")
    parser.add_argument("--granularity", default="pixel")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="a", help="suffix of the result file")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    train, test = jobs.load_datasets("fashion-mnist", subset=args.subset, seed=args.seed)
    fit, val = split_train_val(train, 10_000 / 60_000, seed=args.seed)
    base = snl_fx.TrainConfig(seed=args.seed, progress=False, epochs=args.gate_epochs, finetune_epochs=args.finetune_epochs)
    model = jobs.build_model("small_resnet", "fashion-mnist")
    jobs.pretrain(model, fit, val, base, 8, cache_dir=out, cosine=True,
                  cache_key={"model": "small_resnet", "data": "fashion-mnist", "split": "50k/10k", "subset": args.subset,
                             "seed": args.seed})
    model.cpu().eval()
    teacher = copy.deepcopy(model).requires_grad_(False)
    example = torch.stack([fit[i][0] for i in range(32)])
    rows = []
    result_file = out / f"selection-{args.budget:g}-s{args.seed}-{args.granularity}-{args.tag}.json"
    for cfg in (base,):
        gm = snl_fx.prepare(copy.deepcopy(model), example, granularity=args.granularity)
        budget = snl_fx.budget.resolve_budget(args.budget, snl_fx.relu_count(model, example[:1]).total)
        start = time.perf_counter()
        history = snl_fx.train_gates(gm, fit, budget, cfg, teacher=teacher, val_data=val)
        gate_seconds = time.perf_counter() - start
        values = torch.cat([w.detach().flatten() for w in snl_fx.train.gate_parameters(gm)])
        kept = values[values > cfg.eps]
        soft = {"soft_val": snl_fx.train.evaluate(gm, val, cfg), "count": snl_fx.train.relu_count_gated(gm, cfg.eps),
                "kept_mean": float(kept.mean()) if kept.numel() else None,
                "kept_below_half": int((kept < 0.5).sum()), "gate_seconds": gate_seconds,
                "gate_epochs_run": len(history)}
        for selection in args.selections.split(","):
            g = copy.deepcopy(gm)
            soft_gates = {n: gate.weight.detach().clone() for n, gate in snl_fx.train.gates(g).items()}
            final = snl_fx.binarize(g, budget, tie_break=snl_fx.select.linearization_scores(g, example))
            row = {"selection": selection, "budget": budget, "relu_count": final, **soft,
                   "binarized_val": snl_fx.train.evaluate(g, val, cfg), "binarized_test": snl_fx.train.evaluate(g, test, cfg)}
            if selection.startswith("refine"):
                start = time.perf_counter()
                row.update(snl_fx.select.refine_selection(g, fit, cfg, teacher=teacher), refine_seconds=time.perf_counter() - start)
                row.update(refined_val=snl_fx.train.evaluate(g, val, cfg), refined_test=snl_fx.train.evaluate(g, test, cfg),
                           relu_count=snl_fx.train.relu_count_gated(g, 0.5))
            ramp = soft_gates if selection.endswith("ramp") else None
            records = snl_fx.finetune(g, teacher, fit, cfg, val_data=val, ramp_from=ramp)
            row.update(val_acc=max(r["val_acc"] for r in records), test_acc=snl_fx.train.evaluate(g, test, cfg))
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items()}), flush=True)
            result_file.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
