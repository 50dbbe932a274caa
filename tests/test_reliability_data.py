"""Valid models and data accepted (tuple outputs, several inputs, NumPy labels, BatchNorm with a last
batch of one, frozen weights); bad data, phases out of order and bad networks refused in one line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import TinyCNN

import snl_fx
from snl_fx import SnlFxError
from snl_fx.app import cli
from snl_fx.cost import Network, parse_network

FAST = dict(epochs=1, finetune_epochs=1, batch_size=16, progress=False)
pytestmark = pytest.mark.filterwarnings("ignore:the gates reached")


class TupleOut(nn.Module):
    """Returns (logits, a feature map): training reads the first tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        h = torch.relu(self.c(x))
        return self.fc(h.flatten(1)), h


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6 + 5, 3)

    def forward(self, x, z):
        return self.fc(torch.cat([torch.relu(self.c(x)).flatten(1), torch.relu(z)], 1))


class BatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.c(x))).flatten(1))


class Items(torch.utils.data.Dataset):
    """``n`` seeded (input, label) items; ``two``: the input is (image, vector); ``label`` makes a label."""

    def __init__(self, n: int, two: bool = False, label=int, bad_at: int | None = None) -> None:
        self.n, self.two, self.label, self.bad_at = n, two, label, bad_at

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(1, 6, 6, generator=g)
        if i == self.bad_at:
            x = torch.randn(1, 5, 5, generator=g)
        return ((x, torch.randn(5, generator=g)) if self.two else x), self.label(i % 3)


X = torch.randn(8, 1, 6, 6, generator=torch.Generator().manual_seed(1))
Z = torch.randn(8, 5, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize(
    ("model", "example", "data"),
    [
        (TupleOut, X, Items(64)),
        (TwoInputs, (X, Z), Items(64, two=True)),
        (TupleOut, X, Items(64, label=np.int64)),
        (BatchNormNet, X, Items(16 * 4 + 1 + 7)),  # 10% held out: 65 training items, a last batch of one
    ],
    ids=["tuple-output", "two-inputs", "numpy-labels", "batchnorm-last-batch-of-one"],
)
def test_valid_models_and_data_are_linearized(model, example, data, tmp_path):
    torch.manual_seed(0)
    m = model()
    result = snl_fx.linearize(m, example, 30, data, **FAST)
    assert result.relu_count == 30 == sum(s["after"] for s in result.sites.values())
    args = example if isinstance(example, tuple) else (example,)
    one = tuple(a[:1] for a in args)
    assert snl_fx.relu_count(result.model, one).total == 30
    assert result.accuracy_after is not None
    exported = snl_fx.export_onnx(result.model, one, tmp_path / "m.onnx")  # checks ONNX Runtime == torch
    assert exported.relu_count == snl_fx.relu_count(str(exported.path)).total == 30


def test_frozen_weights_train_the_gates_and_skip_the_fine_tune():
    torch.manual_seed(0)
    model = TinyCNN().requires_grad_(False)
    with pytest.warns(UserWarning, match="no trainable weights"):
        result = snl_fx.linearize(model, torch.randn(4, 1, 8, 8), 40, Items8(64), **FAST)
    assert result.relu_count == 40 and [h["phase"] for h in result.history] == ["gates"]


class Items8(Items):
    def __getitem__(self, i: int):
        return torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(i)), i % 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"data": Items(64, bad_at=63)}, r"item 63 of the Dataset \(data\) has shape \(1, 5, 5\) per sample"),
        ({"data": Items(64), "val_data": Items(8, bad_at=4)}, r"item 4 of the Dataset \(val_data\)"),
        ({"data": Items(64), "val_data": [1, 2]}, r"val_data must be a torch Dataset"),
        ({"data": Items(64, label=float)}, r"the label in item 0 of the Dataset \(data\) is float"),
        ({"data": Items(64, two=True)}, r"has 2 tensor\(s\), the example input 1"),
    ],
)
def test_bad_data_is_refused_before_training(kwargs, message, monkeypatch):
    monkeypatch.setattr("snl_fx.lifecycle.train_gates", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(SnlFxError, match=message) as err:
        snl_fx.linearize(TupleOut(), X, 30, **kwargs, **FAST)
    assert "\n" not in str(err.value)


def _prepared():
    torch.manual_seed(0)
    return snl_fx.prepare(TupleOut(), X)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda gm: snl_fx.train_gates(gm, Items(32), -3, snl_fx.TrainConfig(**FAST)), "budget must be positive"),
        (lambda gm: snl_fx.convert(TupleOut()), "was not prepared by snl_fx"),
        (lambda gm: snl_fx.binarize(TupleOut(), 10), "was not prepared by snl_fx"),
        (lambda gm: snl_fx.binarize(snl_fx.convert(_binarized()), 10), "has no gates"),
        (lambda gm: snl_fx.train_gates(_binarized(), Items(32), 10, snl_fx.TrainConfig(**FAST)), "binarized and frozen"),
    ],
    ids=["negative-budget", "convert-unprepared", "binarize-unprepared", "binarize-lowered", "train-binarized"],
)
def test_phases_out_of_order_are_one_line_errors(call, message):
    with pytest.raises(SnlFxError, match=message) as err:
        call(_prepared())
    assert "\n" not in str(err.value)


def _binarized():
    gm = _prepared()
    snl_fx.binarize(gm, 10)
    return gm


def test_a_fraction_means_the_same_in_every_phase():
    total = 4 * 6 * 6
    gm = _prepared()
    snl_fx.train_gates(gm, Items(64), 0.25, snl_fx.TrainConfig(**FAST))
    assert snl_fx.binarize(gm, 0.25) == round(0.25 * total)


@pytest.mark.parametrize("spec", ["100,inf", "inf,40", "0,40", "nan,1", "100,-1"])
def test_networks_must_be_finite(spec):
    with pytest.raises(SnlFxError, match="finite"):
        parse_network(spec)
    with pytest.raises(SnlFxError):
        snl_fx.Cost(seconds=1.0, network=spec)


def test_a_network_object_is_validated():
    with pytest.raises(SnlFxError, match="bandwidth"):
        Network("mine", 0.0, 10.0)
    assert math.isclose(Network("mine", 10.0, 0.0).seconds(1.25e6, 3), 1.0)


def test_relu_count_cli_refuses_an_infinite_network(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    snl_fx.export_onnx(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()).eval(), torch.randn(1, 1, 6, 6), path)
    assert cli.relu_count_main([str(path), "--network", "100,inf", "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "finite" in captured.err
    assert cli.relu_count_main([str(path), "--network", "100,40", "--json"]) == 0
    json.loads(capsys.readouterr().out)  # valid JSON: no Infinity, no NaN
