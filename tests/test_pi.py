"""CrypTen 2PC runs of exported models (issue 5): accuracy, ReLU traffic and rounds, CLI."""

from __future__ import annotations

import json
import os
import sys

import onnx
import pytest
import torch
import torch.nn as nn
from conftest import TWO_LAYERS_SITE as LAYER
from conftest import TinyCNN, TwoLayers

import snl_fx
from snl_fx import SnlFxError
from snl_fx.app.cli import snl_fx_main
from snl_fx.app.pi import import_crypten, pi_bench

try:
    import_crypten()
except SnlFxError:
    if os.environ.get("CI"):  # CI installs the pi extra: a missing CrypTen there is a failure
        raise
    pytest.skip("CrypTen (the pi extra) is not installed: bash scripts/setup.sh", allow_module_level=True)

CONTRACT = {"max_abs_error", "bytes", "rounds", "seconds", "relus"}




def lowered(kept: tuple[int, int]) -> nn.Module:
    """TwoLayers with the first ``kept[i]`` elements of ReLU layer i kept (all: ReLU, none: identity)."""
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    gm = snl_fx.prepare(TwoLayers(), x)
    with torch.no_grad():
        for gate, k in zip(snl_fx.gate_parameters(gm), kept):
            gate.zero_().view(-1)[:k] = 1
    return snl_fx.convert(gm)


def bench(tmp_path, kept: tuple[int, int]):
    path = tmp_path / f"two_{kept[0]}_{kept[1]}.onnx"
    snl_fx.export_onnx(lowered(kept), torch.randn(1, 1, 8, 8), path, profile="pi")
    return pi_bench(path, runs=1)


@pytest.fixture(scope="module")
def plain_layer(tmp_path_factory):
    """One plain ReLU layer (the other linear): the per-ReLU cost and per-layer rounds."""
    r = bench(tmp_path_factory.mktemp("pi"), (LAYER, 0))
    assert (r.relus, r.relu_layers) == (LAYER, 1)
    assert r.relu_bytes > 0 and r.relu_bytes % LAYER == 0
    return r


def test_linearized_tiny_model_under_2pc(tmp_path, plain_layer):
    per_relu = plain_layer.relu_bytes // LAYER
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    result = snl_fx.linearize(TinyCNN().eval(), x, 50)
    path = tmp_path / "tiny_pi.onnx"
    snl_fx.export_onnx(result.model, x[:1], path, profile="pi")
    r = pi_bench(path, runs=2, input=x[:1])
    assert r.max_abs_error < 1e-2
    assert r.relus == r.comparisons == 50
    assert r.relu_bytes == per_relu * 50
    assert r.relu_rounds == plain_layer.relu_rounds * r.relu_layers
    assert r.bytes > r.relu_bytes and r.rounds > r.relu_rounds and r.seconds > 0
    assert CONTRACT <= r.to_dict().keys()


def test_gather_form_saves_bytes_not_rounds(tmp_path, plain_layer):
    full = bench(tmp_path, (LAYER, LAYER))
    partial = bench(tmp_path, (10, 5))
    one_layer_partial = bench(tmp_path, (10, 0))
    per_relu = plain_layer.relu_bytes // LAYER
    assert full.relu_bytes == per_relu * 2 * LAYER and partial.relu_bytes == per_relu * 15
    assert full.bytes - partial.bytes == per_relu * (2 * LAYER - 15)  # the gathers cost nothing
    assert partial.rounds == full.rounds  # a per-element mask saves bytes, not rounds
    assert one_layer_partial.rounds == plain_layer.rounds < full.rounds  # a whole linear layer saves rounds
    assert full.rounds - plain_layer.rounds == plain_layer.relu_rounds
    for r in (full, partial, one_layer_partial):
        assert r.max_abs_error < 1e-2


class FoldedTwins(nn.Module):
    """Two conv-BN pairs with equal folded biases (the exporter aliases them) and a ReduceMean head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        a = torch.relu(self.bn1(self.conv1(x)))
        b = torch.relu(self.bn2(self.conv2(a)))
        return self.fc(torch.cat([b.mean((2, 3)), torch.flatten(self.pool(a), 1)], 1))


def test_pi_profile_loads_with_no_fix_up(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    result = snl_fx.linearize(FoldedTwins().eval(), x, 30)
    path = tmp_path / "twins.onnx"
    snl_fx.export_onnx(result.model, x[:1], path, profile="pi")
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert "Identity" not in ops and {"ReduceMean", "GlobalAveragePool", "Gather"} <= ops
    r = pi_bench(path, runs=1, input=x[:1])
    assert r.max_abs_error < 1e-2 and r.relus == 30


def test_cli_json_and_errors(tmp_path, capsys):
    path = tmp_path / "two.onnx"
    snl_fx.export_onnx(lowered((7, LAYER)), torch.randn(1, 1, 8, 8), path, profile="pi")
    assert snl_fx_main(["pi-bench", str(path), "--runs", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert CONTRACT <= out.keys() and out["relus"] == 7 + LAYER
    default = tmp_path / "default.onnx"
    snl_fx.export_onnx(lowered((7, LAYER)), torch.randn(1, 1, 8, 8), default)
    assert snl_fx_main(["pi-bench", str(default)]) == 2
    err = capsys.readouterr().err
    assert "profile='pi'" in err and len(err.strip().splitlines()) == 1
    assert snl_fx_main(["pi-bench", str(tmp_path / "missing.onnx")]) == 2
    assert "no such ONNX file" in capsys.readouterr().err


def test_missing_crypten_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "crypten", None)
    with pytest.raises(SnlFxError, match="install the pi extra"):
        import_crypten()


def test_party_failure_is_one_clear_error(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Sin", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    path = tmp_path / "sin.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(SnlFxError, match="CrypTen party [01] failed: .*does not support ONNX op Sin"):
        pi_bench(path, runs=1)


@pytest.mark.parametrize(
    ("layers", "ops"),
    [([nn.GELU()], "Erf"), ([nn.LayerNorm(8)], "LayerNormalization"), ([nn.GELU(), nn.LayerNorm(8)], "Erf.*LayerNorm")],
)
def test_ops_crypten_computes_wrongly_are_refused_by_name(tmp_path, layers, ops):
    """CrypTen 0.4.1's erf is wrong beyond |x| ~ 3 and it has no LayerNorm: one line, never a wrong output."""
    model = nn.Sequential(nn.Linear(8, 8), *layers, nn.Linear(8, 3)).eval()
    path = tmp_path / "m.onnx"
    snl_fx.export_onnx(model, torch.randn(1, 8), path, profile="pi")
    with pytest.raises(snl_fx.SnlFxError, match=rf"cannot run under CrypTen 0.4.1 \({ops}") as err:
        snl_fx.pi_bench(path, runs=1)
    assert "\n" not in str(err.value) and "spu-semi2k" in str(err.value)


class Transformerish(nn.Module):
    """Sigmoid, tanh, softmax (rows of 197), exp, a division by an activation, a product of two."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.sigmoid(x), torch.tanh(x)
        return a + b + torch.softmax(x, dim=-1) + torch.exp(x) + x / (a + 1.0) + a * b


@pytest.fixture(scope="module")
def kinds_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("kinds") / "kinds.onnx"
    x = torch.randn(1, 2, 197, generator=torch.Generator().manual_seed(0))
    snl_fx.export_onnx(Transformerish().eval(), x, path, profile="pi")
    return path, pi_bench(path, runs=1, input=x)


def test_crypten_per_kind_statistics(kinds_run):
    path, r = kinds_run
    assert set(r.kinds) == {"sigmoid", "tanh", "softmax", "exp", "div", "mul"}
    for kind, k in r.kinds.items():
        assert (k["elements"], k["layers"]) == (394, 1), kind
        assert k["rows"] == (2 if kind == "softmax" else 394), kind
        assert k["bytes"] > 0 and k["rounds"] > 0 and k["seconds"] > 0, kind
    assert sum(k["bytes"] for k in r.kinds.values()) <= r.bytes
    assert r.relus == 0 and r.relu_bytes == 0
    # the inspector names and counts the same kinds
    assert {o.kind: o.comparisons for o in snl_fx.relu_count(path).others} == {k: 394 for k in r.kinds}
    # CrypTen's exp is (1 + x/256)^256: about 3% relative error at x = 3; the rest well under 1e-2
    assert r.max_abs_error < 0.05 * max(1.0, r.output_scale), (r.max_abs_error, r.output_scale)


def test_crypten_kind_prices_match_measured(kinds_run):
    path, r = kinds_run
    predicted = snl_fx.pi_cost(path, protocol="crypten").by_kind()
    for kind, k in r.kinds.items():
        assert predicted[kind]["bytes"] == pytest.approx(k["bytes"], rel=0.05), kind
        assert predicted[kind]["rounds"] == k["rounds"], kind
