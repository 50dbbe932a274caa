"""The cost model prices GELU, SiLU, sigmoid, tanh, softmax, LayerNorm, exp, div and mul (issue 18 item 2):
coefficients from the measured table (benchmarks/pi_calibrate_kinds.py), never literals here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from test_spu import needs_spu

import snl_fx
from snl_fx.cost.model import nonlinearity_features
from snl_fx.cost.tables import cost_table, load_constants

ALL_KINDS = ("gelu", "gelu_tanh", "silu", "sigmoid", "tanh", "softmax", "layernorm", "exp", "div", "mul")
PRICED = {  # protocol -> kinds its table must price
    "spu-semi2k": ALL_KINDS,
    "spu-cheetah": ALL_KINDS,
}
ROW_KINDS = ("softmax", "layernorm")


def kind_features(kind: str) -> list[str]:
    return [kind, f"{kind}_layer"] + ([f"{kind}_rows"] if kind in ROW_KINDS else [])


def tree_levels(n: int) -> int:
    """Sequential comparison levels of SPU's reduction of n elements (simulated, not the closed form)."""
    levels = 0
    while n > 1:
        levels += 1 + (n % 2)  # a level; an odd element out is compared once more
        n //= 2
    return levels


class Block(nn.Module):
    """Linear -> LayerNorm -> scores softmax over rows of ``tokens`` -> GELU, on (tokens, d) inputs."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin, self.norm, self.mlp = nn.Linear(d, d), nn.LayerNorm(d), nn.Linear(d, 2 * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.lin(x))
        attn = torch.softmax(h @ h.transpose(-1, -2), dim=-1) @ h
        return nn.functional.gelu(self.mlp(attn))


TOKENS, D = 7, 8  # rows of 7: ceil(log2 7) = 3 levels, and SPU one more (softmax_odd)
EXPECTED = {  # kind -> (layers, elements per layer, row length) of Block on (1, TOKENS, D)
    "layernorm": (1, TOKENS * D, D),
    "softmax": (1, TOKENS * TOKENS, TOKENS),
    "gelu": (1, TOKENS * 2 * D, None),
}


@pytest.mark.parametrize("protocol,kind", [(p, k) for p, kinds in PRICED.items() for k in kinds])
def test_table_has_measured_coefficients(protocol, kind):
    from snl_fx.cost.model import price

    table = cost_table(protocol)
    for feature in kind_features(kind):
        assert feature in table.bytes and feature in table.rounds and feature in table.seconds, feature
    assert table.bytes[kind] > 0
    for elements in (64, 1024, 4096):  # one layer: bytes and at least one round, whatever its size
        nbytes, rounds, _ = price(nonlinearity_features(kind, elements, 16 if kind in ROW_KINDS else None), table)
        assert nbytes > 0 and rounds >= 1, (elements, nbytes, rounds)
    if kind == "softmax":
        for feature in ("softmax_depth", "softmax_odd"):
            assert feature in table.bytes and feature in table.rounds
        assert table.rounds["softmax_depth"] > 0
    run = load_constants()[protocol]["kinds"]
    assert run["backend"] == protocol and run["date"] and "pi_calibrate_kinds.py" in run["command"]
    assert kind in run["kinds"] and run["source"].startswith("measured")


@pytest.mark.parametrize("row,levels", [(1, 0), (2, 1), (3, 2), (16, 4), (17, 5), (24, 5), (64, 6), (65, 7),
                                        (100, 8), (197, 10), (256, 8)])
def test_softmax_depth_is_spu_reduction_levels(row, levels):
    # measured SPU SEMI2K softmax rounds (63 + 8 per level) at these rows: 2: 71, 3: 79, 16: 95, 17: 103,
    # 24: 103, 64: 111, 65: 119, 100: 127, 197: 143, 256: 127
    assert tree_levels(row) == levels
    f = nonlinearity_features("softmax", row * 3, row)
    assert f["softmax_depth"] == math.ceil(math.log2(row)) and f["softmax_depth"] + f["softmax_odd"] == levels


@pytest.mark.parametrize("protocol", sorted(PRICED))
def test_small_transformer_block_priced_from_table(protocol):
    torch.manual_seed(0)
    cost = snl_fx.pi_cost(Block(D).eval(), torch.randn(1, TOKENS, D), protocol)
    assert cost.complete, cost.lower_bound()
    table = cost_table(protocol)
    instances = load_constants()["spu-cheetah"]["ot_instances"]
    by_kind = cost.by_kind()
    for kind, (layers, elements, row) in EXPECTED.items():
        workers = min(instances, math.ceil(elements / 2048))  # SPU CHEETAH's OT instances for the layer
        nbytes = table.bytes[kind] * elements + table.bytes[f"{kind}_layer"] + table.bytes[f"{kind}_ot_workers"] * workers
        rounds = (table.rounds[kind] * elements + table.rounds[f"{kind}_layer"]
                  + table.rounds[f"{kind}_ot_workers"] * workers)
        if row:
            nbytes += table.bytes[f"{kind}_rows"] * (elements // row)
        if kind == "softmax":
            depth = math.ceil(math.log2(row))
            rounds += table.rounds["softmax_depth"] * depth + table.rounds["softmax_odd"] * (tree_levels(row) - depth)
        assert by_kind[kind]["bytes"] == pytest.approx(layers * nbytes, rel=1e-12), kind
        assert by_kind[kind]["rounds"] == layers * round(rounds), kind


def test_silu_is_sigmoid_and_a_product():
    """SPU runs SiLU as its sigmoid and one secret product: the measured prices add up (within 0.1%)."""
    t = cost_table("spu-semi2k")
    assert t.bytes["silu"] == pytest.approx(t.bytes["sigmoid"] + t.bytes["mul"], rel=1e-3)
    assert t.rounds["silu_layer"] == t.rounds["sigmoid_layer"] + t.rounds["mul_layer"]


@pytest.mark.parametrize("protocol", ["spu-semi2k", "spu-cheetah"])
def test_softmax_broadcast_is_a_setting_with_both_prices(protocol):
    """SPU's softmax denominator option: on by default, its own measured coefficients; off: the plain ones."""
    from snl_fx.cost.tables import SOFTMAX_BROADCAST

    entry = load_constants()[protocol]
    on, off, default = (cost_table(protocol, b) for b in (True, False, None))
    assert default.softmax_broadcast is SOFTMAX_BROADCAST is True and on.bytes == default.bytes
    assert off.bytes["softmax"] == entry["bytes"]["softmax"]
    assert on.bytes["softmax"] == entry["softmax_broadcast"]["bytes"]["softmax"] != off.bytes["softmax"]
    assert {k for k in on.bytes if on.bytes[k] != off.bytes[k]} <= {k for k in on.bytes if k.startswith("softmax")}
    assert cost_table("crypten").softmax_broadcast is None
    torch.manual_seed(0)
    model, x = Block(D).eval(), torch.randn(1, TOKENS, D)
    plain, option = (snl_fx.pi_cost(model, x, protocol, softmax_broadcast=b) for b in (False, True))
    assert option.by_kind()["softmax"]["bytes"] < plain.by_kind()["softmax"]["bytes"]
    assert option.by_kind()["gelu"] == plain.by_kind()["gelu"]
    assert any("with SPU's denominator option" in n for n in option.notes)


def _measured_and_predicted(tmp_path, protocol: str, runs: int) -> tuple[dict, dict]:
    """The Block exported (profile pi), run under ``protocol``: measured and predicted per kind."""
    torch.manual_seed(0)
    x = torch.randn(1, TOKENS, D)
    path = tmp_path / "block.onnx"
    snl_fx.export_onnx(Block(D).eval(), x, path, profile="pi")
    cost = snl_fx.pi_cost(path, protocol=protocol)
    assert cost.complete, cost.lower_bound()
    return snl_fx.pi_bench(path, runs=runs, input=x, backend=protocol).kinds, cost.by_kind()


@needs_spu
def test_measured_kinds_match_prediction_semi2k(tmp_path):
    measured, predicted = _measured_and_predicted(tmp_path, "spu-semi2k", runs=1)
    for kind in EXPECTED:
        assert measured[kind]["bytes"] == pytest.approx(predicted[kind]["bytes"], rel=0.05), kind
        assert measured[kind]["rounds"] == predicted[kind]["rounds"], kind


class Heads(nn.Module):
    """Attention written out on (tokens, d) inputs: ``heads`` heads, q scaled by a float, k divided by one."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.qkv, self.heads = nn.Linear(d, 3 * d), heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax((q * 0.25) @ (k / 2.0).transpose(-1, -2), dim=-1)
        return (attn @ v).transpose(1, 2).reshape(b, t, d)


HEADS, HEAD_D = 3, 4


@pytest.fixture(scope="module")
def heads_reports(tmp_path_factory):
    """(torch report, ONNX report) of Heads on (1, TOKENS, HEADS * HEAD_D)."""
    torch.manual_seed(0)
    model, x = Heads(HEADS * HEAD_D, HEADS).eval(), torch.randn(1, TOKENS, HEADS * HEAD_D)
    path = tmp_path_factory.mktemp("heads") / "heads.onnx"
    snl_fx.export_onnx(model, x, path, profile="pi")
    return snl_fx.relu_count(model, x), snl_fx.relu_count(path)


def test_both_inspectors_see_scales_and_heads(heads_reports):
    from snl_fx.cost.model import matmul_heads

    for report in heads_reports:
        assert sorted(s.elements for s in report.scales) == [HEADS * TOKENS * HEAD_D] * 2  # q * 0.25, k / 2
        products = [la for la in report.linear if matmul_heads(la) > 1]
        assert [matmul_heads(la) for la in products] == [HEADS, HEADS]  # q @ k^T, attn @ v
        assert [la.macs for la in products] == [HEADS * TOKENS * HEAD_D * TOKENS] * 2
    torch_report, onnx_report = heads_reports
    assert [s.shape for s in torch_report.scales] == [s.shape for s in onnx_report.scales]


@pytest.mark.parametrize("protocol", ["crypten", "spu-semi2k", "spu-cheetah"])
def test_heads_and_scales_priced_from_table(heads_reports, protocol):
    """A batched matmul is priced as one product per head; a scale as a truncation per element."""
    from snl_fx.cost.model import linear_features, matmul_heads, price

    report = heads_reports[1]
    table = cost_table(protocol)
    for la in report.linear:
        h = matmul_heads(la)
        if h > 1:
            one = type(la)(la.name, la.op, la.input // h, la.weight // h, la.output // h, la.macs // h)
            assert linear_features(la) == {k: h * v for k, v in linear_features(one).items()}
            assert price(linear_features(la), table)[1] == h * price(linear_features(one), table)[1]
    cost = snl_fx.pi_cost(report, protocol=protocol)
    elements = sum(s.elements for s in report.scales)
    assert cost.by_kind()["scale"]["bytes"] == pytest.approx(
        table.bytes["avgpool_output"] * elements + table.bytes["avgpool_layer"] * len(report.scales))
    assert cost.by_kind()["scale"]["rounds"] == round(table.rounds["avgpool_layer"] * len(report.scales))


def test_gelu_scalings_are_part_of_the_gelu(tmp_path):
    """GELU's own products by constants (x / sqrt 2, * 0.5, * 0.044715, ...) run inside it: no scales."""
    for approximate in ("none", "tanh"):
        model, x = nn.Sequential(nn.Linear(8, 8), nn.GELU(approximate)).eval(), torch.randn(1, 8)
        snl_fx.export_onnx(model, x, tmp_path / "g.onnx", profile="pi")
        report = snl_fx.relu_count(tmp_path / "g.onnx")
        assert [o.kind for o in report.others] == ["gelu" if approximate == "none" else "gelu_tanh"]
        assert report.scales == [] and snl_fx.relu_count(model, x).scales == []


@needs_spu
def test_measured_kinds_within_the_stated_bound_cheetah(tmp_path):
    """CHEETAH per kind: rounds within the calibration's stated bound, bytes within one Beaver-triple
    refill (both read from the constants' summary) on a graph of small layers."""
    summary = load_constants()["spu-cheetah"]["kinds"]["summary"]
    refill = max(summary["beaver_refill_bytes"].values())
    measured, predicted = _measured_and_predicted(tmp_path, "spu-cheetah", runs=2)
    for kind in EXPECTED:
        assert abs(measured[kind]["bytes"] - predicted[kind]["bytes"]) <= refill, kind
        assert abs(measured[kind]["rounds"] - predicted[kind]["rounds"]) <= summary["max_rounds_error"], kind
