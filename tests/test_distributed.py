"""Data-parallel SNL: torchrun with 2 gloo processes on CPU follows one process with the same global batch."""

from __future__ import annotations

import math
import os
import runpy
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from snl_fx.train.distributed import ShardedBatchSampler

# The run both sides make: a tiny CNN without BatchNorm, toy data, every phase, a checkpoint dir.
SCRIPT = '''
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import TensorDataset

import snl_fx
from snl_fx.train import distributed

# 256 samples: 230 train after the 10% validation split, 7 batches of 32 and one of 6, each split evenly
# in two; the count falls from 512 over the epochs (to 121 where this was written), binarized to 100
OPTS = dict(epochs=4, finetune_epochs=1, lr=1e-3, gate_lr=0.05, lambda0=1e-4, kappa=3.0, batch_size=32, progress=False)


def run(out_dir, resume=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > 0).long() + (x[:, 0, :, :4].mean((1, 2)) > 0).long()
    return snl_fx.linearize(model, x[:4], 100, TensorDataset(x, y), out_dir=out_dir, resume=resume, **OPTS)


if __name__ == "__main__":
    out = sys.argv[1]
    result = run(out + "/run")
    try:  # SyncBatchNorm runs on GPUs only: refused up front on CPU
        with distributed.data_parallel(nn.BatchNorm1d(2), torch.device("cpu"), sync_bn=True):
            refused = False
    except snl_fx.SnlFxError:
        refused = True
    torch.save({"gated": result.gated.state_dict(), "history": result.history, "sync_bn_refused": refused},
               f"{out}/rank{dist.get_rank()}.pt")
    dist.destroy_process_group()
'''

TOL = 1e-4  # weights, DDP (2 x 16 samples) vs one process (32): float summation order only (measured ~1e-7)


def test_sampler_shards_are_the_single_process_batches():
    single = list(ShardedBatchSampler(230, 64, seed=7))
    shards = [list(ShardedBatchSampler(230, 64, seed=7, rank=r, world=2)) for r in range(2)]
    assert [len(b) for b in single] == [64, 64, 64, 38] and len(shards[0]) == len(shards[1]) == 4
    for whole, a, b in zip(single, *shards):
        assert sorted(a + b) == sorted(whole) and len(a) == len(whole) // 2
    tail = [list(ShardedBatchSampler(5, 4, seed=0, rank=r, world=2))[-1] for r in range(2)]
    assert all(len(t) == 2 for t in tail)  # a last batch of 1 is topped up: both ranks step, BatchNorm sees 2 items
    assert [len(b) for b in ShardedBatchSampler(9, 4, seed=0)] == [4, 4, 2]  # one process: a last batch of 1 too
    assert [len(b) for b in ShardedBatchSampler(10, 4, seed=0)] == [4, 4, 2]  # a last batch of 2 stays as it is


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo")
@pytest.mark.filterwarnings("ignore:the gates reached")  # 4 epochs may end above the budget 100: binarized to it
def test_torchrun_two_ranks_match_one_process(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key, a in ranks[0]["gated"].items():
        assert torch.equal(a, ranks[1]["gated"][key]), f"ranks differ at {key}"
    assert ranks[0]["history"] == ranks[1]["history"]
    assert ranks[0]["sync_bn_refused"] and ranks[1]["sync_bn_refused"]

    single = runpy.run_path(str(script))["run"](None)
    counts = [h["relu_count"] for h in single.history]
    assert any(100 < c < 512 for c in counts), counts  # a real trajectory, not all gates closing at once
    assert counts == [h["relu_count"] for h in ranks[0]["history"]]
    # lambda follows the gates' mass every step: the sum order of DDP's gradients moves it by ~1e-6
    assert [h["phase"] for h in single.history] == [h["phase"] for h in ranks[0]["history"]]
    lambdas = [(a["lambda"], b["lambda"]) for a, b in zip(single.history, ranks[0]["history"]) if a["phase"] == "gates"]
    assert all(math.isclose(a, b, rel_tol=1e-4) for a, b in lambdas), lambdas
    assert all(a["lambda"] is None and b["lambda"] is None
               for a, b in zip(single.history, ranks[0]["history"]) if a["phase"] == "finetune")
    for key, a in single.gated.state_dict().items():
        b = ranks[0]["gated"][key]
        if key.startswith("snl_gates."):
            assert torch.equal(a, b), f"mask {key} differs"
        assert torch.allclose(a, b, rtol=0, atol=TOL), f"{key}: max diff {(a - b).abs().max():.2e}"

    # rank 0's checkpoint is the DDP run's state: resuming it in one process gives the same model
    resumed = runpy.run_path(str(script))["run"](tmp_path / "run", resume=True)
    for key, a in resumed.gated.state_dict().items():
        assert torch.equal(a, ranks[0]["gated"][key]), key
    assert resumed.history == ranks[0]["history"]
