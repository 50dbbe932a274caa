"""The paper's CIFAR-100 ResNet18 recipe (SNL, Cho et al. 2022, table 2), for users with a GPU and the data.

Pretrain (SGD lr 0.1, momentum 0.9, wd 5e-4, batch 256 in the paper, lr x0.1 at 50%/75% of the
epochs), then SNL: Adam lr 1e-3 on weights and pixel gates, lambda0 1e-5, kappa 1.1, eps 0.01,
stem ReLU absent (the paper's convention: 491,520 ReLUs), KD from the original (T=4, equal
weights), fine-tune 100 epochs with SGD lr 1e-3, momentum 0.9. CIFAR-100 is read from
``--data-root`` (torchvision's ``cifar-100-python`` folder), never downloaded.

    python examples/cifar100_resnet18.py --data-root ~/data/cifar-100-python --budget 15000 --out runs/c100
    # the same, from the CLI:
    snl-fx linearize cifar_resnet18 --data cifar100 --data-root ~/data/cifar-100-python --budget 15000 \\
        --pretrain-epochs 160 --epochs 200 --finetune-epochs 100 --batch-size 256 --out runs/c100

Paper (table 2): 12.9K ReLUs 66.53%, 15.0K 67.17%, 24.9K 70.05%, 49.9K 73.75% top-1.
"""

from __future__ import annotations

import argparse

import snl_fx
from snl_fx.app.cli import snl_fx_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--budget", default="15000", help="ReLUs per sample, or a fraction in (0, 1)")
    parser.add_argument("--out", default="runs/c100")
    parser.add_argument("--weights", help="a pretrained state_dict of snl_fx.app.models.cifar_resnet18(100)")
    parser.add_argument("--schedule", choices=["paper", "budget"], default="paper")
    args = parser.parse_args(argv)
    base = snl_fx.TrainConfig()  # the paper's values are the defaults
    cli = ["linearize", "cifar_resnet18", "--data", "cifar100", "--data-root", args.data_root,
           "--budget", args.budget, "--out", args.out, "--schedule", args.schedule,
           "--epochs", "200", "--finetune-epochs", "100", "--batch-size", "256",
           "--lambda0", str(base.lambda0), "--kappa", str(base.kappa), "--eps", str(base.eps), "--lr", str(base.lr),
           "--finetune-lr", str(base.finetune_lr)]
    cli += ["--weights", args.weights] if args.weights else ["--pretrain-epochs", "160"]
    return snl_fx_main(cli)


if __name__ == "__main__":
    raise SystemExit(main())
