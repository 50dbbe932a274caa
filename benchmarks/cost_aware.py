"""Cost-aware SNL vs count-only SNL and layer culling, under CrypTen, over several training seeds.

small_resnet / Fashion-MNIST: one pretrained model, one data split (``--subset`` training images,
10% of them held out for validation; the full 10,000-image test set) and the same number of
training epochs for every method; each fine-tune keeps its best epoch on the validation split.
Test accuracy against the predicted CrypTen latency (``snl_fx.pi_cost``) at WAN and LAN and the
measured one (``snl_fx.pi_bench`` on the ``pi`` export: measured bytes, rounds and local seconds;
latency = local seconds + the network model; ``--measure spu-cheetah`` adds SPU CHEETAH). Rows,
one per method, level and seed (``--seeds``: ``TrainConfig.seed``; the pretrained model is shared):

* ``original``;
* ``snl-count@F/sN``: ``snl_fx.linearize`` to a fraction F of the ReLUs (``--fractions``). The
  predicted WAN latency L of ``snl-count@5%`` (first seed) sets the cost levels of the others:
  ``Cost(seconds=L / S)`` for each speedup S of ``--speedups``;
* ``cost-P@Sx/sN``: ``snl_fx.linearize`` with that Cost and ``penalty=P`` (``--penalties``: ``sites``
  chooses the sites first on validation, ``group`` / ``drop`` the gate-phase formulations); merged;
* ``culling@Sx/sN``: DeepReDuce-style whole layers, most critical first (``pareto.stage_culling_scores``),
  selected to the same Cost by ``CostPlan.select``, fine-tuned for gate + fine-tune epochs.

Same epochs for every method: ``linearize`` gives the fine-tune the gate epochs a gate phase left
when it met its budget early (``moved_epochs``), so every method trains gate + fine-tune epochs.

Resumable: every finished row, and every measurement of it, is written to ``<out>/results.json``
at once and skipped on a rerun; the ``pi`` exports are kept under ``--work``. ``--deadline HH:MM``
(UTC) starts no task that would end after it. ``--table`` prints the Markdown tables of
``results.json`` (mean and standard deviation per method and level, then every row); ``--plot``
redraws ``accuracy_vs_latency.png`` (means, error bars one standard deviation).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/cost_aware.py --subset 5000 --pretrain-epochs 6 --epochs 4 \
        --finetune-epochs 3 --seeds 0,1,2 --penalties sites,group --measure crypten --runs 3 --no-cifar

The ``cifar_resnet18`` cost-only rows (random weights, no training; ``--no-cifar`` skips them):
bytes and rounds of count-only (one-shot scores) at 15K and 50K ReLUs, and of cost-aware (same
scores) and culling selections to a Cost whose part above the linear layers' cost is the
count-only one's / 1.5.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import logging
import os
import sys
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

log = logging.getLogger("cost_aware")
MAIN = 1.5  # the issue's target speedup: the rows every other row is compared with


# ---------------------------------------------------------------- results file, resumable


class Results:
    """``results.json``: rows by key, written (atomically) after every change."""

    def __init__(self, path: Path, args: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
        if not isinstance(self.data.get("small_resnet", {}), dict):
            raise SystemExit(f"{path} is from an older version of this benchmark: use another --out")
        old = self.data.get("args", {})
        for key in ("subset", "pretrain_epochs", "epochs", "finetune_epochs"):
            if key in old and old[key] != args[key]:
                raise SystemExit(f"{path} holds a run with {key}={old[key]}, not {args[key]}: use another --out")
        self.data["args"] = {**old, **args}
        self.data.setdefault("small_resnet", {})

    @property
    def rows(self) -> dict[str, dict[str, Any]]:
        return self.data["small_resnet"]

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        os.replace(tmp, self.path)


# ---------------------------------------------------------------- costs and measurements


def costs(model: torch.nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Predicted CrypTen bytes, rounds, WAN and LAN seconds of one sample, ReLUs, ReLU sites kept."""
    wan, lan = (snl_fx.pi_cost(model, x[:1], "crypten", n) for n in ("wan", "lan"))
    report = snl_fx.relu_count(model, x[:1])
    return {"bytes": wan.bytes, "rounds": wan.rounds, "wan_s": wan.seconds, "lan_s": lan.seconds,
            "relus": report.total, "relu_layers": sum(1 for s in report.sites if s.relus)}


def networks(model: torch.nn.Module, x: torch.Tensor) -> dict[str, Any]:
    return {n: snl_fx.pi_cost(model, x[:1], "crypten", n).network for n in ("wan", "lan")}


def measure(path: Path, backend: str, nets: dict[str, Any], runs: int) -> dict[str, Any]:
    """One backend on one ``pi`` export: measured bytes, rounds, local seconds; WAN/LAN latency."""
    prefix = {"crypten": "m", "spu-cheetah": "cheetah"}[backend]
    start = time.perf_counter()
    r = snl_fx.pi_bench(str(path), runs=runs, backend=backend, timeout=1800.0)
    out = {f"{prefix}_runs": runs, f"{prefix}_bytes": r.bytes, f"{prefix}_rounds": r.rounds, f"{prefix}_local_s": r.seconds,
           f"{prefix}_relus": r.relus, f"{prefix}_error": r.max_abs_error, f"{prefix}_wall_s": time.perf_counter() - start}
    if backend != "crypten":
        out[f"{prefix}_setup_bytes"] = getattr(r, "setup_bytes", None)
    for name, network in nets.items():
        out[f"{prefix}_{name}_s"] = r.seconds + network.seconds(r.bytes, r.rounds)
    return out


# ---------------------------------------------------------------- the methods


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cfg = snl_fx.TrainConfig(epochs=args.epochs, finetune_epochs=args.finetune_epochs, seed=0, progress=False)
        torch.manual_seed(0)
        train, _ = jobs.load_datasets("fashion-mnist", subset=args.subset, seed=0)
        _, self.test = jobs.load_datasets("fashion-mnist")  # the full test set
        self.fit, self.val = split_train_val(train, 0.1, seed=0)
        self.model = jobs.build_model("small_resnet", "fashion-mnist")
        jobs.pretrain(self.model, self.fit, self.val, self.cfg, args.pretrain_epochs, cache_dir=args.out,
                      cache_key={"model": "small_resnet", "subset": args.subset, "epochs": args.pretrain_epochs})
        self.model.cpu().eval()
        self.x = next(iter(torch.utils.data.DataLoader(self.fit, batch_size=32)))[0]
        self.nets = networks(self.model, self.x)
        self.work = Path(args.work)
        (self.work / "onnx").mkdir(parents=True, exist_ok=True)

    def target(self, results: Results, speedup: float, penalty: str = "group") -> snl_fx.Cost:
        ref = results.rows[row_key("snl-count@5%", self.args.seeds[0])]["wan_s"]  # every seed: the first seed's level
        return snl_fx.Cost(seconds=ref / speedup, penalty=penalty)

    def finish(self, key: str, m: torch.nn.Module, val_acc: float | None, seconds: float, **extra: Any) -> dict[str, Any]:
        m = m.cpu().eval()
        snl_fx.export_onnx(m, self.x[:1], self.work / "onnx" / f"{key}.onnx", profile="pi")
        row = {"method": key, "test_acc": snl_fx.train.evaluate(m, self.test, self.cfg), "val_acc": val_acc,
               **costs(m, self.x), "train_s": seconds, **extra}
        return row

    def snl(self, budget: int | float | snl_fx.Cost, seed: int) -> tuple[torch.nn.Module, float | None, dict[str, Any]]:
        """``snl_fx.linearize`` as it is (the fine-tune gets the gate epochs the gate phase left).

        Returns the lowered (merged, for a Cost) model, its validation accuracy and facts.
        """
        cfg = replace(self.cfg, seed=seed)
        r = snl_fx.linearize(self.model, self.x, budget, self.fit, val_data=self.val, config=cfg)
        gates = [h for h in r.history if h["phase"] == "gates"]
        tuned = [h for h in r.history if h["phase"] == "finetune"]
        facts = {"gate_relus": gates[-1]["relu_count"] if gates else None, "gate_epochs": len(gates),
                 "gate_val_acc": [h["val_acc"] for h in gates], "finetune_epochs": len(tuned),
                 "moved_epochs": tuned[0]["moved_epochs"] if tuned else 0, "best_epoch": _best_epoch(tuned),
                 "sites": {n: s["after"] for n, s in r.sites.items()}}
        if r.cost is not None:
            facts.update(merged_ops=r.cost["merged_ops"], cost_budget_wan_s=r.cost["budget"]["limit"])
            if "site_choice" in r.cost:  # penalty "sites": the sites chosen before the gate phase, and how
                facts["site_choice"] = r.cost["site_choice"]
        return r.model, r.accuracy_after, facts

    # one task per row; each returns the rows it made

    def original(self, results: Results) -> dict[str, dict[str, Any]]:
        row = self.finish("original", self.model, snl_fx.train.evaluate(self.model, self.val, self.cfg), 0.0)
        return {"original": row}

    def count(self, results: Results, fraction: float, seed: int) -> dict[str, dict[str, Any]]:
        key = row_key(f"snl-count@{fraction:.0%}", seed)
        start = time.perf_counter()
        m, val_acc, facts = self.snl(fraction, seed)
        return {key: self.finish(key, m, val_acc, time.perf_counter() - start, seed=seed, **facts)}

    def cost(self, results: Results, penalty: str, speedup: float, seed: int) -> dict[str, dict[str, Any]]:
        key = row_key(f"cost-{penalty}@{speedup:g}x", seed)
        start = time.perf_counter()
        m, val_acc, facts = self.snl(self.target(results, speedup, penalty), seed)
        return {key: self.finish(key, m, val_acc, time.perf_counter() - start, seed=seed, **facts)}

    def culling(self, results: Results, speedup: float, seed: int) -> dict[str, dict[str, Any]]:
        key = row_key(f"culling@{speedup:g}x", seed)
        cfg, target = replace(self.cfg, seed=seed), self.target(results, speedup)
        start = time.perf_counter()
        gm = snl_fx.prepare(self.model, self.x)
        plan = target.plan(gm)
        plan.select(gm, scores=stage_culling_scores(gm, site_criticality(gm, self.val, cfg), plan.ceiling))
        teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
        tuned = snl_fx.finetune(gm, teacher, self.fit, replace(cfg, finetune_epochs=cfg.epochs + cfg.finetune_epochs),
                                val_data=self.val)
        culled = snl_fx.convert(gm.eval()).eval()
        facts = {"finetune_epochs": cfg.epochs + cfg.finetune_epochs, "best_epoch": _best_epoch(tuned),
                 "sites": {n: int(v) for n, v in snl_fx.train.site_relu_counts(gm).items()}, "cost_budget_wan_s": target.limit}
        return {key: self.finish(key, culled, snl_fx.train.evaluate(culled, self.val, cfg), time.perf_counter() - start,
                                 seed=seed, **facts)}


def row_key(base: str, seed: int) -> str:
    """``snl-count@5%/s0``: a row per method, level and seed."""
    return f"{base}/s{seed}"


def base_key(key: str) -> str:
    return key.split("/")[0]


def _best_epoch(records: list[dict[str, Any]]) -> int:
    """The fine-tune epoch kept (0: the selection before any fine-tune epoch), as ``finetune`` picks it."""
    best, acc = 0, None
    for r in records:
        if r.get("val_acc") is not None and (acc is None or r["val_acc"] >= acc):
            best, acc = r["epoch"], r["val_acc"]
    return best


# ---------------------------------------------------------------- cifar_resnet18, cost only


def cifar_rows(speedup: float) -> list[dict[str, Any]]:
    """cifar_resnet18, random weights: cost of each selection at 15K and 50K ReLUs (no training)."""
    torch.manual_seed(0)
    model = jobs.build_model("cifar_resnet18", "cifar100").eval()
    x = torch.randn(8, 3, 32, 32)
    rows = []
    for budget in (15000, 50000):
        gm = snl_fx.prepare(model, x)
        scores = snl_fx.select.linearization_scores(gm, x)
        snl_fx.binarize(gm, budget, scores=scores)
        base = costs(snl_fx.convert(gm).eval(), x)
        rows.append({"model": "cifar_resnet18", "budget": budget, "method": "count-only", **base})
        # the linear layers alone may cost more than count-only / speedup: cut the rest by speedup
        fixed = snl_fx.Cost(seconds=base["wan_s"]).plan(snl_fx.prepare(model, x)).base
        target = snl_fx.Cost(seconds=fixed + (base["wan_s"] - fixed) / speedup)
        for method in ("cost-aware", "culling"):
            gm = snl_fx.prepare(model, x)
            plan = target.plan(gm)
            if method == "culling":
                crit = {n: float(s.sum()) for n, s in scores.items()}
                plan.select(gm, scores=stage_culling_scores(gm, crit, plan.ceiling))
            else:
                plan.select(gm, scores=scores)
            rows.append({"model": "cifar_resnet18", "budget": budget, "method": method, "cost_budget_wan_s": target.limit,
                         **costs(snl_fx.convert(gm).eval(), x)})
        log.info("%s", json.dumps(rows[-3:]))
    return rows


# ---------------------------------------------------------------- tasks in priority order


def tasks(args: argparse.Namespace) -> list[tuple[str, str, tuple[Any, ...]]]:
    """(row key, Bench method, arguments): ``original``, then every row of the first seed, then every
    row of the next seed, ...; within a seed count-only 5% first (it sets the cost levels), then the
    first penalty's cost rows and culling level by level, the other fractions, the other penalties.
    ``--only`` keeps some kinds of rows (count, cost, culling)."""
    todo = [("original", "original", ())]
    first, *others = args.penalties
    for seed in args.seeds:
        rows = [("snl-count@5%", "count", (0.05, seed))]
        for s in args.speedups:
            rows += [(f"cost-{first}@{s:g}x", "cost", (first, s, seed)), (f"culling@{s:g}x", "culling", (s, seed))]
        rows += [(f"snl-count@{f:.0%}", "count", (f, seed)) for f in args.fractions if f != 0.05]
        rows += [(f"cost-{p}@{s:g}x", "cost", (p, s, seed)) for p in others for s in args.speedups]
        todo += [(row_key(k, seed), m, a) for k, m, a in rows if not args.only or m in args.only]
    return todo


def past(deadline: str | None, needs: float = 0.0) -> bool:
    """Whether ``needs`` seconds from now end after ``deadline`` (HH:MM UTC, today)."""
    if not deadline:
        return False
    hh, mm = map(int, deadline.split(":"))
    now = dt.datetime.now(dt.timezone.utc)
    return now + dt.timedelta(seconds=needs) > now.replace(hour=hh, minute=mm, second=0, microsecond=0)


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    keys = ("subset", "pretrain_epochs", "epochs", "finetune_epochs")
    results = Results(out / "results.json", {k: getattr(args, k) for k in keys})
    results.save()
    if args.cifar and "cifar_resnet18" not in results.data:
        results.data["cifar_resnet18"] = cifar_rows(MAIN)
        results.save()
    bench = Bench(args)
    backends = [b for b in args.measure.split(",") if b]
    prefix = {"crypten": "m", "spu-cheetah": "cheetah"}
    skipped: list[str] = []
    longest = {"train": 0.0, **{b: 0.0 for b in backends}}  # the longest task of each kind so far

    def measure_row(k: str, backend: str) -> None:
        row = results.rows.get(k)
        if row is None or f"{prefix[backend]}_bytes" in row or row.get(f"{prefix[backend]}_failed"):
            return
        if past(args.deadline, longest[backend]):
            skipped.append(f"{k} {backend}")
            return
        log.info("measure %s under %s", k, backend)
        start = time.perf_counter()
        try:
            runs = args.runs if backend == "crypten" else args.cheetah_runs
            row.update(measure(bench.work / "onnx" / f"{k}.onnx", backend, bench.nets, runs))
        except Exception as exc:  # noqa: BLE001 - a failed measurement is recorded, the run goes on
            log.warning("measuring %s under %s failed: %s", k, backend, exc)
            row[f"{prefix[backend]}_failed"] = str(exc)[:300]
        longest[backend] = max(longest[backend], time.perf_counter() - start)
        results.save()
        log.info("%s %s", k, json.dumps({a: b for a, b in row.items() if a.startswith(prefix[backend] + "_")}))

    for backend in args.remeasure.split(","):  # measure again (e.g. with more --runs): drop the old figures
        for row in results.rows.values() if backend else ():
            for k in [k for k in row if k.startswith(prefix[backend] + "_")]:
                del row[k]
    todo = tasks(args)
    for i, (key, method, params) in enumerate(todo):
        if key not in results.rows:
            if past(args.deadline, longest["train"]):
                skipped.append(key)
                continue
            log.info("row %s: %s%s", key, method, params)
            start = time.perf_counter()
            made = getattr(bench, method)(results, *params)
            for k, row in made.items():
                results.rows[k] = row
                log.info("%s", json.dumps({k: v for k, v in row.items() if k != "sites"}))
            results.save()
            longest["train"] = max(longest["train"], time.perf_counter() - start)
            log.info("row %s done in %.0f s", key, time.perf_counter() - start)
        # CrypTen (1 s) right after every row; CHEETAH (about a minute) right after the main rows, the rest at the end
        if "crypten" in backends:
            measure_row(key, "crypten")
        if "spu-cheetah" in backends and i < 4:
            measure_row(key, "spu-cheetah")
    if "spu-cheetah" in backends:
        for key, _, _ in todo:
            measure_row(key, "spu-cheetah")
    results.data["not_run"] = skipped
    results.save()
    plot(results.data, out / "accuracy_vs_latency.png")
    print(summary(results.data) + "\n\n" + table(results.data))


# ---------------------------------------------------------------- table and plot


def _family(key: str) -> str:
    return key.split("@")[0]


def _wire(r: dict[str, Any], prefix: str, net: str) -> float | None:
    """Seconds on the wire of the measured bytes and rounds (the measured latency less local seconds)."""
    total = r.get(f"{prefix}_{net}_s")
    return None if total is None else total - r[f"{prefix}_local_s"]


def table(data: dict[str, Any]) -> str:
    rows = data.get("small_resnet", {})
    lines = ["| method | test % | val % | ReLUs | ReLU layers | rounds | MB | CrypTen WAN s: pred / meas (wire) "
             "| CrypTen LAN s: pred / meas | CHEETAH MB | CHEETAH rounds | CHEETAH WAN s: wire + local | gate + ft epochs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for key, r in rows.items():
        mb = r.get("cheetah_bytes")
        lines.append(
            f"| {key} | {f(r['test_acc'], '.2f')} | {f(r.get('val_acc'), '.1f')} | {r['relus']:,} | {r['relu_layers']} "
            f"| {r['rounds']} | {r['bytes'] / 1e6:.2f} | {r['wan_s']:.2f} / {f(r.get('m_wan_s'), '.2f')} ({f(_wire(r, 'm', 'wan'), '.2f')}) "
            f"| {r['lan_s']:.3f} / {f(r.get('m_lan_s'), '.3f')} | {f(mb and mb / 1e6, '.2f')} | {f(r.get('cheetah_rounds'), 'd')} "
            f"| {f(_wire(r, 'cheetah', 'wan'), '.2f')} + {f(r.get('cheetah_local_s'), '.1f')} "
            f"| {r.get('gate_epochs', 0)} + {r.get('finetune_epochs', 0)} |")
    if data.get("cifar_resnet18"):
        lines += ["", "| ReLU budget | method | ReLUs | rounds | MB | WAN s | LAN s |", "|---|---|---|---|---|---|---|"]
        for r in data["cifar_resnet18"]:
            name = r["method"] + (f" (Cost {r['cost_budget_wan_s']:.2f} s)" if "cost_budget_wan_s" in r else "")
            lines.append(f"| {r['budget'] // 1000}K | {name} | {r['relus']:,} | {r['rounds']} | {r['bytes'] / 1e6:.1f} "
                         f"| {r['wan_s']:.2f} | {r['lan_s']:.3f} |")
    if data.get("not_run"):
        lines += ["", "Not run (deadline): " + ", ".join(data["not_run"])]
    return "\n".join(lines)


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    m = sum(values) / len(values)
    return m, (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else None


def groups(data: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Rows by method and level (``snl-count@5%``), over seeds, in the order of the file."""
    out: dict[str, list[dict[str, Any]]] = {}
    for key, r in data.get("small_resnet", {}).items():
        out.setdefault(base_key(key), []).append(r)
    return out


def _span(rows: list[dict[str, Any]], key: str) -> str:
    """``5,632`` or ``4,900-5,632``: the range of ``key`` over the rows."""
    lo, hi = min(r[key] for r in rows), max(r[key] for r in rows)
    return f"{lo:,}" if lo == hi else f"{lo:,}-{hi:,}"


def summary(data: dict[str, Any]) -> str:
    """Markdown: one line per method and level, mean and standard deviation over the seeds."""
    lines = ["| method | seeds | test % mean ± sd | test % per seed | val % mean | ReLUs | ReLU layers | CrypTen WAN s: "
             "pred / meas | gate + ft epochs (moved) |", "|---|---|---|---|---|---|---|---|---|"]
    for key, rs in groups(data).items():
        m, sd = mean_sd([r["test_acc"] for r in rs])
        vals = [r["val_acc"] for r in rs if r.get("val_acc") is not None]
        meas = [r["m_wan_s"] for r in rs if r.get("m_wan_s") is not None]
        epochs = ", ".join(f"{r.get('gate_epochs', 0)}+{r.get('finetune_epochs', 0)}"
                           + (f" ({r['moved_epochs']})" if r.get("moved_epochs") else "") for r in rs)
        lines.append(f"| {key} | {len(rs)} | {m:.2f}" + (f" ± {sd:.2f}" if sd is not None else "") + " | "
                     + " / ".join(f"{r['test_acc']:.2f}" for r in rs) + " | "
                     + (f"{mean_sd(vals)[0]:.1f}" if vals else "-") + f" | {_span(rs, 'relus')} | {_span(rs, 'relu_layers')} | "
                     + f"{mean_sd([r['wan_s'] for r in rs])[0]:.2f} / " + (f"{mean_sd(meas)[0]:.2f}" if meas else "-")
                     + f" | {epochs} |")
    return "\n".join(lines)


def plot(data: dict[str, Any], path: Path) -> None:
    """Test accuracy (mean over seeds, error bar one standard deviation) against CrypTen WAN and LAN
    latency (measured where measured, else predicted; mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(lambda r: r.get("m_wan_s", r["wan_s"]), "CrypTen, WAN (100 Mbit/s, 40 ms): s per image"),
              (lambda r: r.get("m_lan_s", r["lan_s"]), "CrypTen, LAN (1 Gbit/s, 0.5 ms): s per image")]
    families = {"snl-count": ("count-only SNL (5/10%)", "o"), "cost-sites": ("cost-aware SNL, sites first", "s"),
                "cost-sites-raw": ("sites first, BatchNorm not re-estimated", "P"),
                "cost-group": ("cost-aware SNL, group term", "D"), "cost-drop": ("cost-aware SNL, drop", "v"),
                "culling": ("layer culling (same Cost)", "^")}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, (xof, title) in zip(axes, panels):
        for fam, (label, marker) in families.items():
            pts = []
            for key, rs in groups(data).items():
                if _family(key) == fam:
                    m, sd = mean_sd([r["test_acc"] for r in rs])
                    pts.append((mean_sd([xof(r) for r in rs])[0], m, sd or 0.0, f"{key.split('@')[1]} (n={len(rs)})"))
            if pts:
                pts.sort()
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker=marker,
                            capsize=3, label=label)
                for p in pts:
                    ax.annotate(p[3], (p[0], p[1]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        orig = data.get("small_resnet", {}).get("original")
        if orig is not None:
            ax.scatter([xof(orig)], [orig["test_acc"]], marker="*", s=140, color="black", label="original", zorder=5)
        ax.set_xlabel(title)
        ax.set_ylabel("test accuracy (%), mean ± sd over seeds")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    args = data.get("args", {})
    fig.suptitle(f"small_resnet / Fashion-MNIST ({args.get('subset')} training images, {args.get('epochs')} gate + "
                 f"{args.get('finetune_epochs')} fine-tune epochs; CrypTen latency = measured local s + measured bytes "
                 "and rounds on the network model)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="5,000 images, 4 pretrain, 3 gate, 2 fine-tune epochs, 1.5x only")
    p.add_argument("--subset", type=int, default=10000, help="training images (10%% of them for validation)")
    p.add_argument("--pretrain-epochs", type=int, default=8)
    p.add_argument("--epochs", type=int, default=6, help="gate epochs (culling: fine-tune epochs + these)")
    p.add_argument("--finetune-epochs", type=int, default=4)
    p.add_argument("--fractions", type=lambda s: [float(v) for v in s.split(",")], default=[0.05, 0.10],
                   help="count-only SNL budgets (fractions of the ReLUs); 0.05 sets the cost levels")
    p.add_argument("--speedups", type=lambda s: [float(v) for v in s.split(",")], default=[1.5, 2.0],
                   help="cost levels: count-only 5%%'s predicted WAN latency / these")
    p.add_argument("--penalties", type=lambda s: s.split(","), default=["sites"],
                   help="cost-aware SNL rows: Cost(penalty=...) formulations, comma-separated (sites, group, drop)")
    p.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0],
                   help="training seeds (TrainConfig.seed) per row; one pretrained model for all")
    p.add_argument("--only", type=lambda s: s.split(","), default=None,
                   help="run only these kinds of rows: count, cost, culling (comma-separated)")
    p.add_argument("--measure", default="", help="comma-separated: crypten, spu-cheetah")
    p.add_argument("--runs", type=int, default=1, help="inferences per measurement (the median is kept)")
    p.add_argument("--cheetah-runs", type=int, default=1, help="--runs of the CHEETAH measurements (about a minute each)")
    p.add_argument("--remeasure", default="", help="comma-separated backends to measure again on every row")
    p.add_argument("--no-cifar", dest="cifar", action="store_false", help="skip the cifar_resnet18 cost rows")
    p.add_argument("--deadline", default=None, help="HH:MM UTC: start no task after it")
    p.add_argument("--out", default="benchmarks/results/cost-aware-seeds")
    p.add_argument("--work", default="runs/cost-aware", help="pi exports for the measurements")
    p.add_argument("--table", action="store_true", help="print the tables of <out>/results.json and exit")
    p.add_argument("--plot", action="store_true", help="redraw <out>/accuracy_vs_latency.png and exit")
    args = p.parse_args(argv)
    if args.quick:
        args.subset, args.pretrain_epochs, args.epochs, args.finetune_epochs = 5000, 4, 3, 2
        args.speedups, args.fractions = [MAIN], [0.05]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.table or args.plot:
        data = json.loads((Path(args.out) / "results.json").read_text())
        if args.plot:
            plot(data, Path(args.out) / "accuracy_vs_latency.png")
        print(summary(data) + "\n\n" + table(data))
        return
    torch.set_num_threads(1)
    run(args)


if __name__ == "__main__":
    main()
