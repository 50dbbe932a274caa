"""End-to-end jobs shared by the ``snl-fx`` CLI, the demo and the benchmarks.

Data sets by name, models by name or spec, cached pretraining, and writing a run's outputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import Dataset, Subset

from snl_fx import passes
from snl_fx._files import (
    FileIds,
    check_writable_dir,
    load_checked,
    save_atomic,
    write_atomic,
    write_text_atomic,
    written_since,
)
from snl_fx.errors import SnlFxError
from snl_fx.export import Profile, export_onnx
from snl_fx.inspect.report import ReluReport
from snl_fx.lifecycle import LinearizeResult
from snl_fx.train import distributed
from snl_fx.train.config import TrainConfig
from snl_fx.train.loop import (
    announce,
    epoch_line,
    evaluate,
    make_loader,
    seed_epoch,
    timed,
    train_epoch,
)

from .data import DATASETS

log = logging.getLogger("snl_fx")

# the files a run writes into its output folder, in the order they are listed; the pretrain cache
# (pretrained-*.pt and .json) is listed when the run wrote it, never removed, and other files are left alone
CACHE_PREFIX = "pretrained-"
OUTPUTS = ("model.onnx", "model_state_dict.pt", "gated_state_dict.pt", "report.json", "relus_per_layer.png",
           "checkpoint.pt")


def load_datasets(name: str, root: str | None = None, subset: int | None = None, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(train, test) for a name of :data:`snl_fx.app.data.DATASETS`; ``subset`` keeps a fixed random sample of each."""
    spec = DATASETS.get(name)
    if spec is None:
        raise SnlFxError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
    if spec.needs_root and root is None:
        raise SnlFxError(f"data set {name} is read from a folder you give: --data-root PATH (nothing is downloaded)")
    train, test = spec.load(root, True), spec.load(root, False)
    if subset is not None:
        train, test = _sample(train, subset, seed), _sample(test, max(subset // 5, 1), seed + 1)
    return train, test


def _sample(dataset: Dataset, n: int, seed: int) -> Dataset:
    if n >= len(dataset):
        return dataset
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    return Subset(dataset, sorted(idx.tolist()))


def build_model(spec: str, dataset: str) -> nn.Module:
    """A zoo name (``small_resnet``, ``cifar_resnet18``, ...) sized for the data set, or any spec."""
    from ._spec import load_model_spec
    from .models import MODELS

    shape, classes = DATASETS[dataset].shape, DATASETS[dataset].classes
    if spec in MODELS:
        kwargs: dict[str, Any] = {"num_classes": classes}
        if spec == "small_resnet":
            kwargs["in_channels"] = shape[0]
        return MODELS[spec](**kwargs)
    return load_model_spec(spec)


def pretrain(
    model: nn.Module, train: Dataset, val: Dataset | None, cfg: TrainConfig, epochs: int, lr: float = 0.1,
    cache_dir: str | os.PathLike | None = None, cache_key: dict[str, Any] | None = None, cosine: bool = False,
) -> nn.Module:
    """The paper's recipe (SGD lr 0.1, momentum 0.9, wd 5e-4, lr x0.1 at 50% and 75% of the epochs).

    ``cosine``: a cosine decay over the epochs instead of the two steps.

    With ``cache_dir`` the weights are saved (atomically, checksums verified on load) as
    ``pretrained-<digest>.pt`` beside a key of the settings;
    a later call with the same key loads them instead of training again. Under torchrun every
    rank trains (not data-parallel) and rank 0 alone writes the cache.
    """
    key = json.dumps({**(cache_key or {}), "epochs": epochs, "lr": lr, "seed": cfg.seed,
                      **({"cosine": True} if cosine else {})}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"{CACHE_PREFIX}{digest}.pt" if cache_dir is not None else None
    device = cfg.resolved_device()
    model.to(device)
    if path is not None and path.exists():
        state = load_checked(path, "delete it to pretrain again", map_location=device)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise SnlFxError(f"{path} holds weights of another model: delete it to pretrain again") from exc
        log.info("reusing pretrained weights %s", path)
        return model
    if path is not None and distributed.is_main():
        check_writable_dir(path.parent, "the pretrain cache folder")  # before training, not after
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    if cosine:
        scheduler: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    else:
        milestones = sorted({max(1, epochs // 2), max(1, (3 * epochs) // 4)})
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    for epoch in range(1, epochs + 1):
        loader = make_loader(train, cfg, shuffle=True, epoch_seed=seed_epoch(cfg, "pretrain", epoch))
        stats = timed(lambda: train_epoch(model, None, loader, optimizer, cfg, desc=f"pretrain {epoch}/{epochs}"))
        scheduler.step()
        record = {"phase": "pretrain", "epoch": epoch, **stats, "val_acc": evaluate(model, val, cfg)}
        announce(epoch_line(record), cfg)
    if path is not None and distributed.is_main():
        save_atomic(model.state_dict(), path)
        write_text_atomic(key + "\n", path.with_suffix(".json"))
    return model


def check_checkpoint_matches(out_dir: str | os.PathLike, model: nn.Module) -> None:
    """Refuse to resume from ``out_dir``'s checkpoint when it holds weights of another model."""
    from snl_fx.train.loop import Checkpoint

    checkpoint = Checkpoint(out_dir)
    state = checkpoint.load()
    if state is None:
        return
    mine = model.state_dict()
    for key, value in state.get("model", {}).items():
        if key.startswith(f"{passes.GATES_PREFIX}."):
            continue
        if key not in mine or tuple(mine[key].shape) != tuple(value.shape):
            here = tuple(mine[key].shape) if key in mine else "absent"
            raise SnlFxError(
                f"{checkpoint.path} was written for another model ({key}: {tuple(value.shape)} there, {here} here): "
                "use another --out or drop --resume"
            )


def write_outputs(
    result: LinearizeResult, example_input: torch.Tensor, out_dir: str | os.PathLike, extra: dict[str, Any] | None = None,
    profile: Profile = "default", *, before: FileIds | None = None, resume: bool = False, plot_title: str | None = None,
) -> dict[str, Any]:
    """Write the lowered model (state_dict), the gated state_dict, the ONNX file and report.json.

    Each file is written atomically, the ONNX file first and only once it passed its checks
    (a refused export changes nothing). Then the folder is left holding only this run's
    outputs: a file of :data:`OUTPUTS` that this run did not write (an earlier run's
    ``gated_state_dict.pt`` when nothing was removed) is deleted. Which files this run wrote
    comes from ``before``, :func:`snl_fx._files.file_ids` of the folder at the start of the run
    (a checkpoint or pretrain cache written since counts as this run's); without it only the
    files written here count, and ``checkpoint.pt`` and ``relus_per_layer.png`` are left alone.
    ``resume``: the run was asked to continue from ``checkpoint.pt``, which is then kept.
    ``plot_title``: also plot the ReLUs per layer to ``relus_per_layer.png``.

    Returns report.json's content; its ``outputs`` names exactly the files this run wrote.
    Under torchrun rank 0 writes and every rank gets its report.
    """
    return distributed.on_rank0(
        lambda: _write_outputs(result, example_input, out_dir, extra, profile, before, resume, plot_title)
    )


def _write_outputs(
    result: LinearizeResult, example_input: torch.Tensor, out_dir: str | os.PathLike, extra: dict[str, Any] | None,
    profile: Profile, before: FileIds | None, resume: bool, plot_title: str | None,
) -> dict[str, Any]:
    out = Path(out_dir)
    check_writable_dir(out, "the output folder")  # one line naming it, not a temporary file
    exported = export_onnx(result.model, example_input[:1].cpu(), out / "model.onnx", profile=profile)
    written = {"model.onnx"}
    save_atomic(result.model.state_dict(), out / "model_state_dict.pt")
    written.add("model_state_dict.pt")
    if result.gated is not None:
        save_atomic(result.gated.state_dict(), out / "gated_state_dict.pt")
        written.add("gated_state_dict.pt")
    if plot_title is not None:
        from .plots import plot_relus_per_layer

        write_atomic(out / "relus_per_layer.png", lambda tmp: plot_relus_per_layer(result.sites, tmp, plot_title), ".png")
        written.add("relus_per_layer.png")
    if before is not None:
        written |= {n for n in written_since(out, before) if n in OUTPUTS or n.startswith(CACHE_PREFIX)}
        kept = {"checkpoint.pt"} if resume else set()
    else:
        kept = {"checkpoint.pt", "relus_per_layer.png"}
    written.add("report.json")
    for name in set(OUTPUTS) - written - kept:
        (out / name).unlink(missing_ok=True)
    first = {name: i for i, name in enumerate(OUTPUTS)}
    outputs = sorted(written, key=lambda n: (first.get(n, len(first)), n))
    report = {**result.to_dict(), **(extra or {}), "onnx": str(exported.path), "onnx_relu_count": exported.relu_count,
              "onnx_max_abs_error": exported.max_abs_error, "outputs": outputs}
    write_text_atomic(json.dumps(report, indent=2, default=str) + "\n", out / "report.json")
    return report


def summary(
    before: ReluReport, after: ReluReport, acc_before: float | None, acc_after: float | None,
    protocol: str = "crypten", network: str = "wan", families: list[str] | None = None,
) -> str:
    """A before/after table: ReLUs, accuracy and the predicted private-inference cost of one sample.

    The cost is the calibrated model's, :func:`snl_fx.pi_cost` of each report under ``protocol``
    and ``network`` (the same figures as ``snl_fx.pi_cost(model, x[:1], protocol, network)``).

    Args:
        before: ``relu_count`` of the original model (one sample).
        after: ``relu_count`` of the linearized model.
        acc_before: test accuracy in percent of the original model, or None.
        acc_after: that of the linearized model, or None.
        protocol: the protocol priced (see :func:`snl_fx.cost.protocols`).
        network: ``lan``, ``wan`` or ``MBPS,RTT_MS``.
        families: gated nonlinearity families other than ReLU to state (``["gelu", "softmax"]``).

    Returns:
        The table, a line naming the protocol and network, and the ReLU cut.

    Example:
        >>> print(summary(relu_count(model, x[:1]), relu_count(result.model, x[:1]), 91.2, 89.9))
    """
    from snl_fx.cost import pi_cost

    def acc(a: float | None) -> str:
        return "n/a" if a is None else f"{a:.2f}%"

    costs = [pi_cost(rep, protocol=protocol, network=network) for rep in (before, after)]
    rows = [("", "ReLUs/sample", "ReLU layers", "test acc", "PI bytes", "PI rounds", "PI latency")]
    for label, rep, a, c in (("original", before, acc_before, costs[0]), ("linearized", after, acc_after, costs[1])):
        rounds = "?" if c.rounds is None else f"{c.rounds:,}"
        rows.append((label, f"{rep.total:,}", str(rep.relu_layers), acc(a), f"{c.bytes / 1e6:,.3f} MB", rounds,
                     f"{c.seconds:.3f} s"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.append(f"PI: one private inference of one sample under {costs[0].protocol}, network "
                 f"{costs[0].network.describe()}, predicted by the calibrated cost model (snl_fx.pi_cost)")
    for family in [f for f in families or [] if f != "relu"]:
        b, a = before.family_count(family), after.family_count(family)
        lines.append(f"{family} elements cut {b / max(a, 1):.1f}x ({b:,} -> {a:,} per sample)")
    if before.total or not families:
        ratio = before.total / max(after.total, 1)
        lines.append(f"ReLUs cut {ratio:.1f}x ({before.total:,} -> {after.total:,} per sample)")
    return "\n".join(lines)
