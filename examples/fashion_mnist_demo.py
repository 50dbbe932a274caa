"""The demo: cut a small ResNet's ReLUs to 5% on Fashion-MNIST, end to end, on CPU.

Pretrains the model (cached in the output dir), linearizes it with pixel-wise SNL gates to the
budget, fine-tunes with knowledge distillation, exports ONNX, prints a before/after summary (ReLUs,
accuracy, and the predicted private-inference cost under CrypTen on a WAN) and saves three plots.
About 9 minutes on 2 CPU cores; ``--quick`` runs a tiny version in ~1 minute.

    python examples/fashion_mnist_demo.py --out runs/demo
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import snl_fx
from snl_fx.app import jobs
from snl_fx.app.cli import set_default_threads
from snl_fx.app.data import split_train_val
from snl_fx.app.plots import (
    plot_accuracy_vs_relus,
    plot_gate_path,
    plot_relus_per_layer,
)


def main(argv: list[str] | None = None) -> dict:
    """Run the demo; returns what it writes to ``summary.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--data-root", help="folder of the Fashion-MNIST idx files (default: Debian's)")
    parser.add_argument("--budget", type=float, default=0.05, help="fraction of the ReLUs to keep")
    parser.add_argument("--quick", action="store_true", help="a 2,000-image, 1-epoch smoke run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    set_default_threads()  # as the CLIs do: one core left free, so a busy machine does not stall training
    start = time.perf_counter()
    torch.manual_seed(args.seed)

    subset = 2000 if args.quick else 30000
    pretrain_epochs, gate_epochs, finetune_epochs = (1, 1, 1) if args.quick else (4, 4, 3)
    train, test = jobs.load_datasets("fashion-mnist", args.data_root, subset=subset, seed=args.seed)
    fit, val = split_train_val(train, 0.1, seed=args.seed)
    # the library's defaults: only the epoch counts are chosen here
    cfg = snl_fx.TrainConfig(epochs=gate_epochs, finetune_epochs=finetune_epochs, seed=args.seed)

    model = jobs.build_model("small_resnet", "fashion-mnist")
    jobs.pretrain(model, fit, val, cfg, pretrain_epochs, cache_dir=args.out,
                  cache_key={"model": "small_resnet", "data": "fashion-mnist", "subset": subset})
    model.cpu().eval()
    example = torch.stack([fit[i][0] for i in range(32)])
    acc_before = snl_fx.train.evaluate(model, test, cfg)

    result = snl_fx.linearize(model, example, args.budget, fit, val_data=val, out_dir=args.out, resume=True, config=cfg)
    acc_after = snl_fx.train.evaluate(result.model, test, cfg)
    report = jobs.write_outputs(result, example, args.out,
                                {"test_acc_before": acc_before, "test_acc_after": acc_after, "quick": args.quick})

    before, after = snl_fx.relu_count(model, example[:1]), snl_fx.relu_count(result.model, example[:1])
    plot_relus_per_layer(result.sites, f"{args.out}/relus_per_layer.png", "small ResNet on Fashion-MNIST: ReLUs per layer")
    path = [(h["relu_count"], h["val_acc"]) for h in result.history if h["phase"] == "gates" and h["val_acc"] is not None]
    plot_accuracy_vs_relus({"gate phase, soft gates (val)": path, "SNL pixel, final (test)": [(after.total, acc_after)]},
                           f"{args.out}/accuracy_vs_relus.png", "Fashion-MNIST, small ResNet",
                           reference=(before.total, acc_before))
    plot_gate_path(result.history, f"{args.out}/gate_path.png", result.budget, "small ResNet: the gate phase, step by step")
    print()
    print(jobs.summary(before, after, acc_before, acc_after, protocol="crypten", network="wan"))
    print(f"ONNX: {report['onnx']} ({report['onnx_relu_count']:,} ReLUs read back from the file, "
          f"ONNX Runtime max abs error {report['onnx_max_abs_error']:.1e})")
    print(f"plots: {args.out}/relus_per_layer.png, {args.out}/accuracy_vs_relus.png, {args.out}/gate_path.png; "
          f"report: {args.out}/report.json")
    print(f"wall time {time.perf_counter() - start:.0f} s")
    summary = {"relus_before": before.total, "relus_after": after.total, "test_acc_before": acc_before,
               "test_acc_after": acc_after, "onnx_relus": report["onnx_relu_count"],
               "seconds": time.perf_counter() - start}
    # the figures the summary printed: the calibrated model's prediction for one sample
    costs = {"before": snl_fx.pi_cost(model, example[:1], "crypten", "wan"),
             "after": snl_fx.pi_cost(result.model, example[:1], "crypten", "wan")}
    summary["pi_cost"] = {"protocol": "crypten", "network": "wan",
                          **{k: {"bytes": c.bytes, "rounds": c.rounds, "seconds": c.seconds} for k, c in costs.items()}}
    Path(args.out, "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
