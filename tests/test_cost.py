"""The PI cost model (issue 8): pi_cost vs measured runs, per-layer pricing, networks, CLI."""

from __future__ import annotations

import inspect
import json
import os

import pytest
import torch
import torch.nn as nn

import snl_fx
import snl_fx.cost.model
from snl_fx import SnlFxError
from snl_fx.app.cli import relu_count_main
from snl_fx.cost import MEASURED_PROTOCOLS, PROTOCOLS, cost_table, linear_cost, protocols, relu_site_cost


class Tiny(nn.Module):
    """conv-relu-maxpool-conv-relu-linear on 1x8x8: linear layers, two ReLU layers, a 2x2 max-pool."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        x = self.pool(self.relu1(self.conv1(x)))
        return self.fc(torch.flatten(self.relu2(self.conv2(x)), 1))


def tiny_lowered(kept: int) -> tuple[nn.Module, torch.Tensor]:
    """Tiny with ``kept`` ReLUs per sample left (pixel gates, first elements of relu1 first)."""
    torch.manual_seed(0)
    x = torch.randn(1, 1, 8, 8)
    gm = snl_fx.prepare(Tiny().eval(), x)
    with torch.no_grad():
        for gate in snl_fx.gate_parameters(gm):
            gate.zero_()
            n = min(kept, gate.numel())
            gate.view(-1)[:n] = 1
            kept -= n
    return snl_fx.convert(gm), x


def runnable(backend: str) -> str | None:
    """Why ``backend`` cannot be measured here, or None."""
    if backend not in protocols():
        return f"{backend} has no calibrated constants in snl_fx/pi_constants.json"
    if backend == "crypten":
        try:
            snl_fx.pi.import_crypten()
        except SnlFxError:
            return None if os.environ.get("CI") else "CrypTen (the pi extra) is not installed"
        return None
    if "backend" not in inspect.signature(snl_fx.pi_bench).parameters:
        return "snl_fx.pi_bench has no SPU backend"
    if not os.path.isdir(".venv-spu"):
        return "the SPU venv (.venv-spu) does not exist"
    if "maxpool4_output" not in cost_table(backend).bytes:
        return f"{backend}'s constants do not price a 2x2 max-pool (calibrated without one)"
    return None


@pytest.mark.parametrize("backend", MEASURED_PROTOCOLS)
def test_prediction_matches_a_measured_run(tmp_path, backend):
    reason = runnable(backend)
    if reason:
        pytest.skip(reason)
    model, x = tiny_lowered(100)  # relu1 keeps 100 of 256, relu2 none: one partial ReLU layer left
    path = tmp_path / "tiny.onnx"
    snl_fx.export_onnx(model, x, path, profile="pi")
    kwargs = {} if backend == "crypten" else {"backend": backend}
    measured = snl_fx.pi_bench(path, runs=1, input=x, **kwargs)
    predicted = snl_fx.pi_cost(path, protocol=backend, network="lan")
    assert abs(predicted.bytes - measured.bytes) <= 0.05 * measured.bytes
    assert predicted.rounds == measured.rounds
    relu = predicted.by_kind()["relu"]
    assert relu["rounds"] == measured.relu_rounds
    assert abs(relu["bytes"] - measured.relu_bytes) <= 0.05 * measured.relu_bytes


@pytest.mark.parametrize(
    ("layer", "shape", "patch"),
    [
        (nn.Conv2d(3, 8, 3, padding=1), (1, 3, 8, 8), 8 * 8 * 3 * 9),  # im2col: Hout*Wout*Cin*k*k
        (nn.Conv2d(3, 8, 3, stride=2, padding=1), (1, 3, 16, 16), 8 * 8 * 3 * 9),
        (nn.Conv2d(16, 32, 1, stride=2), (1, 16, 14, 14), 7 * 7 * 16),
        (nn.Linear(48, 10), (1, 48), 48),
    ],
)
def test_linear_patch_is_the_im2col_size_spu_opens(layer, shape, patch):
    (linear,) = snl_fx.relu_count(nn.Sequential(layer).eval(), torch.randn(shape)).linear
    assert snl_fx.cost.model.linear_features(linear)["linear_patch"] == patch


def test_torch_module_and_its_onnx_file_cost_the_same(tmp_path):
    model, x = tiny_lowered(70)
    path = tmp_path / "tiny.onnx"
    snl_fx.export_onnx(model, x, path, profile="pi")
    from_torch = snl_fx.pi_cost(model, torch.randn(4, 1, 8, 8), protocol="crypten")  # any batch: per sample
    from_onnx = snl_fx.pi_cost(path, protocol="crypten")
    assert (from_torch.bytes, from_torch.rounds) == (from_onnx.bytes, from_onnx.rounds)
    kinds = [layer.kind for layer in from_onnx.layers]
    assert kinds.count("linear") == 3 and kinds.count("relu") == 1 and kinds.count("maxpool") == 1
    assert [layer.elements for layer in from_onnx.layers if layer.kind == "relu"] == [70]


class AvgPoolNet(nn.Module):
    """conv-relu-avgpool(2)-conv-relu-global mean on 1x8x8: two average pools, spelled two ways."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.gap = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        y = torch.relu(self.conv2(x))
        return self.gap(y).flatten(1) + y.mean(dim=(2, 3))


def test_average_pools_are_priced_per_output(tmp_path):
    """SPU truncates after an average pool's division: bytes per output and rounds per layer; CrypTen: free."""
    torch.manual_seed(0)
    model, x = AvgPoolNet().eval(), torch.randn(1, 1, 8, 8)
    path = tmp_path / "avgpool.onnx"
    snl_fx.export_onnx(model, x, path, profile="pi")
    for source in ((model, x), (path,)):
        for protocol in ("spu-semi2k", "crypten"):
            table = cost_table(protocol)
            per_output, per_layer = table.bytes["avgpool_output"], table.bytes["avgpool_layer"]
            rounds = int(table.rounds["avgpool_layer"])
            cost = snl_fx.pi_cost(*source, protocol=protocol)
            pools = [(la.kind, la.elements, la.bytes, la.rounds) for la in cost.layers if la.kind == "avgpool"]
            assert sorted(pools) == [("avgpool", n, n * per_output + per_layer, rounds) for n in (6, 6, 64)]
            totals = cost.by_kind()["avgpool"]
            assert totals["bytes"] == pytest.approx(76 * per_output + 3 * per_layer) and totals["rounds"] == 3 * rounds
    assert cost_table("crypten").bytes["avgpool_output"] == 0  # CrypTen's average pool is local
    report = snl_fx.relu_count(path)
    assert report.other_totals()["avgpool"] == 64 + 6 + 6
    assert "average pool (linear; one truncation per output): 76 outputs per sample" in report.table()
    assert {o["kind"] for o in report.to_dict()["others"]} == {"avgpool"}


def test_relu_site_cost_scales_with_kept_relus_and_rounds_with_layers():
    one, rounds = relu_site_cost(1000, "crypten")
    two, rounds2 = relu_site_cost(2000, "crypten")
    assert two == pytest.approx(2 * one) and one > 0
    assert rounds == rounds2 > 0
    assert relu_site_cost(0, "crypten") == (0.0, 0)


def test_removing_relus_cuts_relu_bytes_but_not_linear_ones():
    full = snl_fx.pi_cost(*tiny_lowered(320), protocol="crypten").by_kind()
    part = snl_fx.pi_cost(*tiny_lowered(32), protocol="crypten").by_kind()
    assert part["relu"]["bytes"] == pytest.approx(full["relu"]["bytes"] * 32 / 320)
    assert part["relu"]["rounds"] == full["relu"]["rounds"] / 2  # relu2 is gone as a layer
    assert part["linear"] == full["linear"]
    report = snl_fx.relu_count(*tiny_lowered(32))
    assert linear_cost(report.linear, "crypten") == (full["linear"]["bytes"], full["linear"]["rounds"])


def test_latency_is_compute_plus_bandwidth_plus_round_trips():
    model, x = tiny_lowered(100)
    lan = snl_fx.pi_cost(model, x, protocol="crypten", network="lan")
    slow = snl_fx.pi_cost(model, x, protocol="crypten", network="10,100")
    assert lan.seconds == pytest.approx(lan.compute_seconds + lan.bytes * 8 / 1e9 + lan.rounds * 0.5e-3)
    assert slow.seconds == pytest.approx(slow.compute_seconds + slow.bytes * 8 / 10e6 + slow.rounds * 0.1)
    assert snl_fx.pi_cost(model, x, network="1000,0.5").seconds == pytest.approx(lan.seconds)


@pytest.mark.parametrize("protocol", [p.name for p in PROTOCOLS if not p.calibrated])
def test_literature_protocols_price_relus_only_and_say_so(protocol):
    model, x = tiny_lowered(100)
    cost = snl_fx.pi_cost(model, x, protocol=protocol)
    row = next(p for p in snl_fx.PROTOCOLS if p.name == protocol)
    assert cost.bytes == pytest.approx(100 * cost_table(protocol).bytes["relu"]) == pytest.approx(100 * row.bytes_per_relu)
    assert cost.rounds is None
    left_out = [layer for layer in cost.layers if layer.kind != "relu"]
    assert left_out and all(layer.bytes is None and "ReLUs only" in layer.note for layer in left_out)
    assert row.source in cost.source and any(row.leaves_out in n for n in cost.notes)


def test_one_table_of_protocols_and_backends():
    """Every list of protocols or backends is derived from snl_fx.cost.PROTOCOLS."""
    from snl_fx.app import _spu, pi

    assert snl_fx.PROTOCOLS is PROTOCOLS
    assert protocols() == tuple(p.name for p in PROTOCOLS)  # every calibrated protocol has constants
    assert MEASURED_PROTOCOLS == tuple(p.name for p in PROTOCOLS if p.calibrated)
    assert pi.BACKENDS == tuple(p.backend for p in PROTOCOLS if p.backend) == MEASURED_PROTOCOLS
    assert _spu.PROTOCOLS == {p.backend: p.spu for p in PROTOCOLS if p.spu}
    for p in PROTOCOLS:
        table = cost_table(p.name)
        assert (table.measured is not None) == p.calibrated
        assert table.source == p.source if p.calibrated else table.source.startswith(p.source)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"protocol": "garbled"}, "unknown protocol 'garbled'"),
        ({"network": "fast"}, "network must be lan, wan or MBPS,RTT_MS"),
        ({"network": "0,10"}, "bandwidth must be a finite number > 0"),
        ({"network": "100,40,3"}, "network must be"),
    ],
)
def test_bad_protocol_or_network_is_one_line(kwargs, words):
    with pytest.raises(SnlFxError) as e:
        snl_fx.pi_cost(*tiny_lowered(10), **kwargs)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_relu_count_cli_protocol(tmp_path, capsys):
    """One cost section: ``pi_cost``, priced under --protocol (default crypten) and --network (default wan)."""
    model, x = tiny_lowered(100)
    path = tmp_path / "tiny.onnx"
    snl_fx.export_onnx(model, x, path, profile="pi")
    assert relu_count_main([str(path), "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert "costs" not in plain and [k for k in plain if "cost" in k] == ["pi_cost"]
    default = snl_fx.pi_cost(path, protocol="crypten", network="wan")
    assert (plain["pi_cost"]["protocol"], plain["pi_cost"]["network"]["name"]) == ("crypten", "wan")
    assert (plain["pi_cost"]["bytes"], plain["pi_cost"]["rounds"]) == (default.bytes, default.rounds)
    assert relu_count_main([str(path), "--protocol", "spu-semi2k", "--network", "lan", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {k: v for k, v in out.items() if k != "pi_cost"} == {k: v for k, v in plain.items() if k != "pi_cost"}
    expected = snl_fx.pi_cost(path, protocol="spu-semi2k", network="lan")
    assert out["pi_cost"]["bytes"] == expected.bytes and out["pi_cost"]["rounds"] == expected.rounds
    assert relu_count_main([str(path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].endswith(f"{default.headline()} (--protocol P for the per-layer table)")
    assert not any("DELPHI" in line or "delphi" in line or "estimated" in line for line in lines)
    assert relu_count_main([str(path), "--protocol", "crypten"]) == 0
    table = capsys.readouterr().out
    assert "private inference under crypten, network wan" in table and "total" in table
    assert relu_count_main([str(path), "--protocol", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("relu-count: error: unknown protocol 'nope'") and "\n" not in err
