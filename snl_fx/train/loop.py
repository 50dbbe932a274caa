"""What both phases train with: the epoch loop, the (KD) loss of a batch, data loaders, evaluation, checkpoints."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves, tree_map_only
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from snl_fx._files import load_checked, save_atomic
from snl_fx.errors import SnlFxError
from snl_fx.train import distributed
from snl_fx.train.config import TrainConfig

log = logging.getLogger("snl_fx")


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    temperature: float,
    weight: float,
) -> torch.Tensor:
    """Cross-entropy to ``labels``; with ``teacher_logits``, ``(1 - weight) * CE + weight * T^2 * KL``.

    KL is KL(teacher || student) of the outputs softened by ``T = temperature`` (Hinton et al.);
    ``T^2`` keeps its gradients at the scale of the cross-entropy's.
    ``TrainConfig.temperature`` and ``kd_weight`` are what the phases pass.

    Args:
        student_logits: the trained model's outputs, ``(batch, classes)``.
        teacher_logits: the teacher's outputs of the same shape (no gradient needed); None: CE only.
        labels: class indices, ``(batch,)``.
        temperature: ``T`` > 0, the softening of both outputs.
        weight: the KL term's share in [0, 1].

    Returns:
        The loss, a scalar tensor (mean over the batch).

    Example:
        >>> with torch.no_grad():
        ...     target = teacher(x)
        >>> loss = snl_fx.train.kd_loss(gm(x), target, y, temperature=4.0, weight=0.5)
        >>> loss.backward()
    """
    ce = F.cross_entropy(student_logits, labels)
    if teacher_logits is None:
        return ce
    t = temperature
    kl = F.kl_div(
        F.log_softmax(student_logits / t, 1), F.log_softmax(teacher_logits / t, 1), reduction="batchmean", log_target=True
    )
    return (1 - weight) * ce + weight * kl * t * t


def to_device(x: Any, device: torch.device) -> Any:
    """A batch's input on ``device``: a tensor, or a tuple/list of them (a model of several inputs)."""
    return tree_map_only(torch.Tensor, lambda t: t.to(device, non_blocking=True), x)


def run(model: nn.Module, x: Any) -> Any:
    """``model(x)``, or ``model(*x)`` for a tuple/list of inputs (as a batch of a multi-input data set)."""
    return model(*x) if isinstance(x, (tuple, list)) else model(x)


def logits(out: Any) -> torch.Tensor:
    """The tensor the loss and the accuracy read: the output, or the first tensor of a tuple/dict output."""
    if isinstance(out, torch.Tensor):
        return out
    first = next((t for t in tree_leaves(out) if isinstance(t, torch.Tensor)), None)
    if first is None:
        raise SnlFxError(f"the model returned {type(out).__name__} with no tensor: snl_fx trains on a tensor of logits")
    return first


def batch_loss(model: nn.Module, teacher: nn.Module | None, x: Any, y: torch.Tensor,
               cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loss of one batch (:func:`kd_loss`, the teacher's outputs under no_grad when
    ``cfg.kd``) and the model's logits. ``x`` and ``y`` are on the model's device."""
    out = logits(run(model, x))
    with torch.no_grad():
        target = logits(run(teacher, x)) if teacher is not None and cfg.kd else None
    return kd_loss(out, target, y, temperature=cfg.temperature, weight=cfg.kd_weight), out


def make_loader(
    data: Dataset | DataLoader, cfg: TrainConfig, shuffle: bool, epoch_seed: int | None = None, shard: bool = False
) -> DataLoader:
    """A DataLoader over ``data`` (used as it is when it already is one), shuffled reproducibly.

    ``shuffle``: a permutation seeded by ``epoch_seed`` (random without one) cut into batches of
    ``cfg.batch_size``; ``shard``: this rank's share of each batch when training is distributed.
    """
    if isinstance(data, DataLoader):
        return data
    if not shuffle:
        return DataLoader(data, batch_size=cfg.batch_size, num_workers=cfg.num_workers)
    seed = epoch_seed if epoch_seed is not None else int(torch.randint(2**62, ()))
    rank, world = (distributed.rank(), distributed.world_size()) if shard else (0, 1)
    sampler = distributed.ShardedBatchSampler(len(data), cfg.batch_size, seed, rank, world)  # type: ignore[arg-type]
    return DataLoader(data, batch_sampler=sampler, num_workers=cfg.num_workers, generator=torch.Generator().manual_seed(seed))


def split_train_val(dataset: Dataset, val_fraction: float = 0.1, seed: int = 0) -> tuple[Subset, Subset]:
    """Split a training set into disjoint (train, val) subsets, the same for the same seed.

    ``round(len * val_fraction)`` samples (at least one) go to validation. Both subsets view
    ``dataset`` itself, so an augmenting dataset augments its validation items too; to validate
    without augmentation, build the data set again with ``augment=False`` and take
    ``Subset(plain, val.indices)``.
    """
    if not 0.0 < val_fraction < 1.0:
        raise SnlFxError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    n = len(dataset)  # type: ignore[arg-type]
    if n < 2:
        raise SnlFxError(f"cannot split a data set of {n} samples into train and val")
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx = sorted(perm[:n_val].tolist())
    train_idx = sorted(perm[n_val:].tolist())
    return Subset(dataset, train_idx), Subset(dataset, val_idx)


def seed_epoch(cfg: TrainConfig, phase: str, epoch: int) -> int:
    """Seed every RNG for one epoch, so a resumed run replays exactly what a straight run does."""
    seed = cfg.seed * 1_000_003 + {"pretrain": 0, "gates": 10_007, "finetune": 20_011}[phase] + epoch
    torch.manual_seed(seed)
    return seed


def train_epoch(
    model: nn.Module,
    teacher: nn.Module | None,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    penalty: Callable[[], torch.Tensor] | None = None,
    after_step: Callable[[], bool | None] | None = None,
    desc: str = "",
) -> dict[str, float]:
    """One epoch of SGD/Adam on (KD) loss + penalty; raises SnlFxError on a non-finite loss."""
    device = cfg.resolved_device()
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc=desc, leave=False, disable=not (cfg.progress and distributed.is_main()), dynamic_ncols=True)
    for step, (x, y) in enumerate(bar):
        x, y = to_device(x, device), y.to(device, non_blocking=True)
        loss, out = batch_loss(model, teacher, x, y, cfg)
        if penalty is not None:
            loss = loss + penalty()
        if not torch.isfinite(loss):
            raise SnlFxError(
                f"loss became {loss.item()} in {desc or 'training'} at step {step}: lower the learning rate "
                "or lambda; the last good checkpoint (if an output dir was given) is kept"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(y)
        correct += int((out.argmax(1) == y).sum())
        seen += len(y)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{total_loss / seen:.4f}")
        if after_step is not None and after_step():
            break  # the caller is done with this epoch (e.g. the ReLU count met the budget)
    return {"loss": total_loss / max(seen, 1), "train_acc": 100.0 * correct / max(seen, 1)}


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset | DataLoader | None, cfg: TrainConfig) -> float | None:
    """Top-1 accuracy in percent (None without data); the model's mode is restored.

    Args:
        model: a classifier, on ``cfg``'s device; run in eval mode without gradients.
        data: a Dataset or DataLoader of (input, label) pairs, or None.
        cfg: the :class:`TrainConfig` giving the device, ``batch_size`` and ``num_workers``.

    Returns:
        The accuracy in [0, 100], or None when ``data`` is None.

    Example:
        >>> snl_fx.train.evaluate(result.model, val_set, snl_fx.TrainConfig(batch_size=256))
    """
    if data is None:
        return None
    device = cfg.resolved_device()
    was_training = model.training
    model.eval()
    correct = seen = 0
    try:
        for x, y in make_loader(data, cfg, shuffle=False):
            out = logits(run(model, to_device(x, device)))
            correct += int((out.argmax(1).cpu() == y).sum())
            seen += len(y)
    finally:
        model.train(was_training)
    return 100.0 * correct / max(seen, 1)


class Checkpoint:
    """One checkpoint file in an output dir, written atomically, its checksums verified on load.

    Distributed: rank 0 writes while the others wait, and rank 0's read reaches every rank.
    """

    def __init__(self, out_dir: str | os.PathLike | None) -> None:
        self.path = Path(out_dir) / "checkpoint.pt" if out_dir is not None else None

    def save(self, state: dict[str, Any]) -> None:
        if self.path is None:
            return
        if distributed.is_main():
            save_atomic(state, self.path)
        distributed.barrier()

    def load(self) -> dict[str, Any] | None:
        return distributed.on_rank0(self._read)

    def _read(self) -> dict[str, Any] | None:
        if self.path is None or not self.path.exists():
            return None
        return load_checked(self.path, "delete it, or drop --resume (resume=False) to start again")


def epoch_line(record: dict[str, Any]) -> str:
    """One human-readable line for an epoch's history record."""
    parts = [f"{record['phase']} epoch {record['epoch']}"]
    counts = record.get("counts") or {}
    parts += [f"{family} {n:,}" for family, n in counts.items()]
    for key, fmt in (("relu_count", "ReLUs {:,}") if not counts else ("", ""), ("lambda", "lambda {:.3g}"), ("loss", "loss {:.4f}"),
                     ("val_acc", "val acc {:.2f}%"), ("seconds", "{:.1f}s")):
        value = record.get(key) if key else None
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            parts.append(fmt.format(value))
    return ", ".join(parts)


def announce(line: str, cfg: TrainConfig) -> None:
    """Print a progress line above the progress bars, or log it when bars are off (rank 0 only)."""
    if not distributed.is_main():
        return
    if cfg.progress:
        tqdm.write(line)
    else:
        log.info(line)


def timed(fn: Callable[[], dict[str, float]]) -> dict[str, float]:
    """Run ``fn`` and add its wall time in seconds under ``seconds``."""
    start = time.perf_counter()
    out = fn()
    out["seconds"] = time.perf_counter() - start
    return out
