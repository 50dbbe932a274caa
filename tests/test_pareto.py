"""benchmarks/pareto.py on a tiny synthetic problem: mask choices, exact counts, one full sweep."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

import snl_fx
from snl_fx import passes
from snl_fx.app.models import small_resnet

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "pareto.py"
_spec = importlib.util.spec_from_file_location("pareto_bench", _PATH)
pareto = importlib.util.module_from_spec(_spec)
sys.modules["pareto_bench"] = pareto
_spec.loader.exec_module(pareto)

# small_resnet at 8x8: 2 sites of 16x8x8, 2 of 32x4x4, 2 of 64x2x2
TOTAL = 2 * 16 * 8 * 8 + 2 * 32 * 4 * 4 + 2 * 64 * 2 * 2


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def toy_setup(n: int = 32) -> pareto.Setup:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > 0).long()
    data = TensorDataset(x, y)
    cfg = snl_fx.TrainConfig(epochs=1, finetune_epochs=1, gate_lr=0.1, lambda0=1e-2, batch_size=32,
                             device="cpu", progress=False)
    torch.manual_seed(0)
    model = small_resnet(num_classes=2).eval()
    return pareto.Setup(model, data, data, data, x[:8], x[:16], cfg)


@pytest.mark.parametrize("method", ["random", "one-shot", "stage-culling"])
@pytest.mark.parametrize("budget", [1, 100, 16 * 8 * 8 + 50, TOTAL - 1])
def test_pixel_baselines_exact(method: str, budget: int) -> None:
    gm, count = pareto.choose_mask(toy_setup(), method, budget)
    assert count == budget == snl_fx.relu_count_gated(gm, eps=0.5)
    assert snl_fx.relu_count(snl_fx.convert(gm), toy_setup().example[:1]).total == budget


def test_stage_culling_keeps_whole_sites_most_critical_first() -> None:
    setup = toy_setup()
    gm = snl_fx.prepare(setup.model, setup.example)
    names = list(passes.gates(gm))
    crit = {n: float(i) for i, n in enumerate(names)}  # the last site is the most critical
    budget = 2 * 64 * 2 * 2 + 10  # the two last sites fit whole, then 10 more
    snl_fx.binarize(gm, budget, scores=pareto.stage_culling_scores(gm, crit, budget))
    counts = snl_fx.site_relu_counts(gm, eps=0.5)
    assert counts[names[-1]] == counts[names[-2]] == 64 * 2 * 2  # most critical: whole
    assert counts[names[-3]] == 10  # next most critical (does not fit whole): a prefix of it
    assert passes.gates(gm)[names[-3]].weight.flatten()[:10].all()
    assert sum(counts.values()) == budget


def test_l1_prune_fits_and_zeroes_pruned_channels() -> None:
    setup = toy_setup()
    budget = TOTAL // 4
    gm, count = pareto.choose_mask(setup, "l1-prune", budget)
    assert count == snl_fx.relu_count_gated(gm, eps=0.5) <= budget
    assert count > budget - 16 * 8 * 8  # greedy packing leaves less than one big channel free
    outputs = {}
    hooks = [g.register_forward_hook(lambda m, i, o, n=n: outputs.__setitem__(n, o))
             for n, g in passes.gates(gm).items()]
    with torch.no_grad():
        gm(setup.example)
    for h in hooks:
        h.remove()
    for name, gate in passes.gates(gm).items():
        pruned = gate.weight.flatten() == 0
        assert (outputs[name][:, pruned] == 0).all()
        assert (outputs[name][:, ~pruned] >= 0).all()
    # every site keeps about the same fraction of its channels
    fractions = [float(g.weight.mean()) for g in passes.gates(gm).values()]
    assert max(fractions) - min(fractions) < 0.35


@pytest.mark.filterwarnings("ignore:the gates reached")
def test_sweep_writes_results(tmp_path: Path) -> None:
    setup = toy_setup()
    rows = pareto.run_all(setup, [200], pareto.METHODS, [], TOTAL)
    assert {r["method"] for r in rows} == set(pareto.METHODS)
    for r in rows:
        assert r["relu_count"] <= 200 and r["exact"] == (r["relu_count"] == 200)
        if r["granularity"] == "pixel":
            assert r["relu_count"] == 200
    again = pareto.run_all(setup, [200], pareto.METHODS, list(rows), TOTAL)  # resumable: nothing new
    assert len(again) == len(rows)
    pareto.write(tmp_path, rows, {"settings": {}})
    pareto.plot(tmp_path, rows, (TOTAL, 50.0), "toy")
    assert (tmp_path / "results.csv").read_text().count("\n") == len(rows) + 1
    assert (tmp_path / "pareto.png").stat().st_size > 0
    assert "SNL pixel - best baseline" in pareto.table(rows, pareto.METHODS)
