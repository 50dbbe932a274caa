"""Behaviour unchanged: the same seeded runs give identical masks, state dicts and records.

Runs a fixed set of small seeded ``snl_fx.linearize`` calls (count budgets pixel and channel,
a fraction, Cost budgets in seconds, bytes and rounds, the one-shot selection) through public
names only, and saves what each produced. Run it on two checkouts on the same machine and
compare:

    PYTHONPATH=/path/to/old OMP_NUM_THREADS=1 python benchmarks/same_behaviour.py --save old.pt
    OMP_NUM_THREADS=1 python benchmarks/same_behaviour.py --save new.pt --compare old.pt

``--compare`` checks every tensor with ``torch.equal`` and every record and count for equality,
and prints one line per run.
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import snl_fx


class Net(nn.Module):
    """conv-bn-relu -> conv-relu -> residual -> maxpool -> linear: 3 ReLU sites of 4x8x8."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.c3 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn(self.c1(x)))
        b = torch.relu(self.c2(a)) + a
        c = self.c3(b).relu()
        return self.fc(F.max_pool2d(c, 2).flatten(1))


def runs() -> dict[str, dict]:
    """name -> (budget, keyword arguments) of each run."""
    wan = snl_fx.pi_cost(Net(), torch.randn(1, 1, 8, 8), "crypten", "wan")
    return {
        "count-pixel": {"budget": 40},
        "count-channel": {"budget": 100, "granularity": "channel"},
        "fraction-skip": {"budget": 0.4, "skip": ["relu"]},
        "cost-seconds": {"budget": snl_fx.Cost(seconds=wan.seconds * 0.8, network="wan")},
        "cost-bytes": {"budget": snl_fx.Cost(bytes=wan.bytes * 0.9, protocol="crypten")},
        "cost-rounds-drop": {"budget": snl_fx.Cost(rounds=wan.rounds - 9, penalty="drop")},
        "one-shot": {"budget": 50, "data": None},
    }


def run(name: str, spec: dict) -> dict:
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(8, 1, 8, 8)
    data = torch.utils.data.TensorDataset(torch.randn(160, 1, 8, 8), torch.randint(0, 3, (160,)))
    spec = dict(spec)
    budget = spec.pop("budget")
    data = spec.pop("data", data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = snl_fx.linearize(model, x, budget, data, epochs=3, finetune_epochs=2, batch_size=16, progress=False, **spec)
    with torch.no_grad():
        out = r.model(x)
    return {
        "relu_count": r.relu_count, "budget": r.budget, "method": r.method, "sites": r.sites, "cost": r.cost,
        "history": [{k: v for k, v in h.items() if k != "seconds"} for h in r.history],
        "gated": None if r.gated is None else {k: v.clone() for k, v in r.gated.state_dict().items()},
        "lowered": {k: v.clone() for k, v in r.model.state_dict().items()},
        "output": out,
    }


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save", required=True, help="write the results here")
    parser.add_argument("--compare", help="results of another checkout to compare with")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {name: run(name, spec) for name, spec in runs().items()}
    torch.save(results, args.save)
    if args.compare:
        other = torch.load(args.compare, weights_only=False)
        bad = 0
        for name, r in results.items():
            diff = [k for k in r if not same(r[k], other[name][k])]
            bad += bool(diff)
            print(f"{name:18s} {'identical' if not diff else 'DIFFERS in ' + ', '.join(diff)}  "
                  f"(ReLUs {r['relu_count']}, method {r['method']})")
        print(f"{len(results) - bad} of {len(results)} runs identical")
        raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
