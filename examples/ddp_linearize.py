"""Linearize a small ResNet on Fashion-MNIST with data-parallel training: launch it with torchrun.

    torchrun --standalone --nproc_per_node=2 examples/ddp_linearize.py --out runs/ddp
    python examples/ddp_linearize.py --out runs/ddp_1proc     # the same run in one process

``snl_fx.linearize`` starts the process group itself (gloo on CPU; NCCL on GPUs, one GPU per
process from LOCAL_RANK) and trains in DistributedDataParallel. ``--batch-size`` is the global
batch, split over the processes. Rank 0 alone pretrains (linearize starts every rank from rank
0's model), prints and writes files. Prints the seconds per epoch of both phases.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.distributed as dist

import snl_fx
from snl_fx.app import jobs
from snl_fx.app.data import split_train_val
from snl_fx.train import distributed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/ddp")
    parser.add_argument("--subset", type=int, default=6000, help="training images used")
    parser.add_argument("--budget", type=float, default=0.05, help="fraction of the ReLUs to keep")
    parser.add_argument("--pretrain-epochs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="max epochs of the gate phase")
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128, help="global batch (all processes together)")
    parser.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm while training (GPUs only)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    train, test = jobs.load_datasets("fashion-mnist", subset=args.subset, seed=args.seed)
    fit, val = split_train_val(train, 0.1, seed=args.seed)
    cfg = snl_fx.TrainConfig(
        epochs=args.epochs, finetune_epochs=args.finetune_epochs, gate_lr=1e-2, lambda0=1e-3, kappa=1.5,
        batch_size=args.batch_size, seed=args.seed, sync_bn=args.sync_bn,
    )
    model = jobs.build_model("small_resnet", "fashion-mnist")
    if distributed.is_main():  # the other ranks wait in linearize and get these weights from rank 0
        jobs.pretrain(model, fit, val, cfg, args.pretrain_epochs, cache_dir=args.out,
                      cache_key={"model": "small_resnet", "data": "fashion-mnist", "subset": args.subset})
    model.cpu().eval()
    example = torch.stack([fit[i][0] for i in range(32)])

    result = snl_fx.linearize(model, example, args.budget, fit, val_data=val, out_dir=args.out, resume=args.resume,
                              **vars(cfg))
    test_acc = distributed.on_rank0(lambda: snl_fx.train.evaluate(result.model, test, cfg))
    jobs.write_outputs(result, example, args.out, {"test_acc_after": test_acc, "world_size": distributed.world_size()})

    if distributed.is_main():
        seconds = {phase: statistics.median(h["seconds"] for h in result.history if h["phase"] == phase)
                   for phase in ("gates", "finetune") if any(h["phase"] == phase for h in result.history)}
        timing = {"world_size": distributed.world_size(), "global_batch": args.batch_size, "train_images": len(fit),
                  "seconds_per_epoch": seconds}
        Path(args.out, "timing.json").write_text(json.dumps(timing, indent=2) + "\n")
        print(f"{distributed.world_size()} process(es): ReLUs {result.relu_count_before:,} -> {result.relu_count:,}, "
              f"val acc {result.accuracy_before:.2f}% -> {result.accuracy_after:.2f}%, test acc {test_acc:.2f}%")
        print("median seconds per epoch: " + ", ".join(f"{p} {s:.2f}" for p, s in seconds.items()))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
