"""The relu-count and snl-fx count command lines: one-line errors, JSON output, the entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from snl_fx.app.cli import relu_count_main, snl_fx_main


def conv_relu_onnx(path: Path, dims=(1, 3, 8, 8)) -> Path:
    """x -> Conv(16 out channels, 3x3, pad 1) -> Relu: 16*8*8 ReLUs per sample at 8x8."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[w],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture
def factories(tmp_path, monkeypatch) -> str:
    """A module of model factories on sys.path; returns its name."""
    (tmp_path / "cli_factories.py").write_text(
        "import torch.nn as nn\n"
        "from snl_fx.app.models import cifar_resnet18\n"
        "def boom():\n"
        "    raise RuntimeError('no weights here')\n"
        "def not_a_model():\n"
        "    return 42\n"
        "def stem_relu():\n"
        "    return cifar_resnet18(stem_relu=True)\n"
        "def conv_relu():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())\n"
    )
    (tmp_path / "cli_broken.py").write_text("import no_such_package_for_snl_fx_tests\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "cli_factories"


def run_cli(main, argv, capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, out: str, err: str, *words: str) -> None:
    assert code != 0
    assert out == ""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("relu-count: error: ")
    for word in words:
        assert word in lines[0]


# --- bad input: one line on stderr, non-zero exit, no traceback -------------------------------
def _missing(tmp_path):
    return [str(tmp_path / "nope.onnx")], ["no such ONNX file"]


def _text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a model\n" * 10)
    return [str(path)], ["not a readable ONNX model"]


def _truncated(tmp_path):
    data = conv_relu_onnx(tmp_path / "full.onnx").read_bytes()
    path = tmp_path / "half.onnx"
    path.write_bytes(data[: len(data) // 2])
    return [str(path)], ["half.onnx"]


def _dynamic_dims(tmp_path):
    path = conv_relu_onnx(tmp_path / "dyn.onnx", dims=("batch", 3, "h", "w"))
    return [str(path)], ["'x'", "--input-shape"]


def _onnx_wrong_rank(tmp_path):
    return [str(conv_relu_onnx(tmp_path / "m.onnx")), "--input-shape", "1,3,8"], ["rank"]


def _spec_does_not_import(tmp_path):
    return ["cli_broken:build", "--input-shape", "1,3,8,8"], ["cannot import 'cli_broken'", "ModuleNotFoundError"]


def _spec_without_colon(tmp_path):
    return ["cli_factories", "--input-shape", "1,3,8,8"], ["package.module:factory"]


def _spec_missing_attribute(tmp_path):
    return ["cli_factories:nothing", "--input-shape", "1,3,8,8"], ["no attribute 'nothing'"]


def _factory_raises(tmp_path):
    return ["cli_factories:boom", "--input-shape", "1,3,8,8"], ["RuntimeError", "no weights here"]


def _factory_returns_no_module(tmp_path):
    return ["cli_factories:not_a_model", "--input-shape", "1,3,8,8"], ["int", "not an nn.Module"]


def _unknown_torchvision_model(tmp_path):
    return ["torchvision:resnet_nope", "--input-shape", "1,3,8,8"], ["resnet_nope"]


def _spec_without_input_shape(tmp_path):
    return ["cli_factories:conv_relu"], ["--input-shape"]


def _shape_not_integers(tmp_path):
    return ["cli_factories:conv_relu", "--input-shape", "1,3,a,8"], ["'1,3,a,8'"]


def _shape_empty(tmp_path):
    return ["cli_factories:conv_relu", "--input-shape", ","], ["positive"]


def _shape_zero(tmp_path):
    return ["cli_factories:conv_relu", "--input-shape", "0,3,8,8"], ["positive"]


def _shape_wrong_channels(tmp_path):
    return ["cli_factories:conv_relu", "--input-shape", "1,5,8,8"], ["failed at", "channels"]


def _shape_wrong_rank(tmp_path):
    return ["cli_factories:conv_relu", "--input-shape", "2,8"], ["failed at"]


def _too_many_inputs(tmp_path):
    return ["cli_factories:conv_relu", "--input-shape", "1,3,8,8", "--input-shape", "1,3,8,8"], ["2 example inputs"]


BAD_INPUTS = [
    _missing, _text_file, _truncated, _dynamic_dims, _onnx_wrong_rank, _spec_does_not_import, _spec_without_colon,
    _spec_missing_attribute, _factory_raises, _factory_returns_no_module, _unknown_torchvision_model,
    _spec_without_input_shape, _shape_not_integers, _shape_empty, _shape_zero, _shape_wrong_channels,
    _shape_wrong_rank, _too_many_inputs,
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda f: f.__name__.strip("_"))
def test_bad_input_is_one_line_error(tmp_path, factories, capsys, case):
    argv, words = case(tmp_path)
    code, out, err = run_cli(relu_count_main, argv, capsys)
    assert code == 2
    assert_one_line_error(code, out, err, *words)


def test_bad_input_through_snl_fx_count(tmp_path, capsys):
    code, out, err = run_cli(snl_fx_main, ["count", str(tmp_path / "nope.onnx")], capsys)
    assert_one_line_error(code, out, err, "no such ONNX file")


# --- output -----------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("spec", ["snl_fx.app.models:cifar_resnet18", "snl_fx.models:cifar_resnet18", "cli_factories:stem_relu"])
def test_json_total_is_relus_per_sample(factories, capsys, spec, batch):
    code, out, err = run_cli(relu_count_main, [spec, "--input-shape", f"{batch},3,32,32", "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)  # the whole of stdout is one JSON object
    # two ReLUs per BasicBlock, two blocks per stage; stage i has 64*2^i channels at (32/2^i)^2
    blocks = sum(2 * 2 * (64 * 2**i) * (32 // 2**i) ** 2 for i in range(4))
    stem = 64 * 32 * 32 if spec.endswith("stem_relu") else 0
    assert report["total"] == blocks + stem == (557_056 if stem else 491_520)
    assert report["total"] == sum(s["relus"] for s in report["sites"])
    assert len(report["sites"]) == 16 + bool(stem)


@pytest.mark.parametrize("batch", [1, 4])
def test_onnx_json_total_is_relus_per_sample(tmp_path, capsys, batch):
    path = conv_relu_onnx(tmp_path / "dyn.onnx", dims=("batch", 3, 8, 8))
    code, out, err = run_cli(relu_count_main, [str(path), "--input-shape", f"{batch},3,8,8", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["total"] == 16 * 8 * 8


def test_table_shows_sites_and_total(factories, capsys):
    code, out, err = run_cli(relu_count_main, ["cli_factories:conv_relu", "--input-shape", "2,3,8,8"], capsys)
    assert code == 0, err
    assert "4x8x8" in out
    assert f"total: {4 * 8 * 8:,} ReLUs per sample in 1 ReLU layers" in out
    last = out.strip().splitlines()[-1]  # one calibrated cost line, no literature estimates
    assert last.startswith("predicted private inference (snl_fx.pi_cost): crypten, network wan")
    assert last.endswith("(--protocol P for the per-layer table)") and "estimated" not in out


@pytest.mark.parametrize(
    "argv",
    [
        ["cli_factories:conv_relu", "--input-shape", "2,3,8,8", "--json"],
        ["--json", "--input-shape", "2,3,8,8", "cli_factories:conv_relu"],  # options first
    ],
)
def test_snl_fx_count_forwards_to_relu_count(factories, capsys, argv):
    code, direct, err = run_cli(relu_count_main, argv, capsys)
    assert code == 0, err
    code, forwarded, err = run_cli(snl_fx_main, ["count", *argv], capsys)
    assert code == 0, err
    assert forwarded == direct
    assert json.loads(forwarded)["total"] == 4 * 8 * 8


def test_console_script_entry_point(tmp_path):
    """The installed ``relu-count`` script, as a real process: JSON on stdout, errors on stderr."""
    script = Path(sys.executable).parent / "relu-count"
    assert script.exists(), "install the package: pip install -e .[dev]"
    path = conv_relu_onnx(tmp_path / "m.onnx")
    done = subprocess.run([str(script), str(path), "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["total"] == 16 * 8 * 8
    assert "costs" not in out and (out["pi_cost"]["protocol"], out["pi_cost"]["network"]["name"]) == ("crypten", "wan")


def test_train_options_come_from_the_trainconfig_fields():
    import argparse
    import typing

    import snl_fx
    from snl_fx.app.cli import _add_train_options

    parser = argparse.ArgumentParser()
    _add_train_options(parser)
    args = parser.parse_args(["--lambda0", "1e-4", "--gate-lr", "0.01", "--schedule", "paper", "--device", "cpu"])
    assert (args.lambda0, args.gate_lr, args.schedule, args.device) == (1e-4, 0.01, "paper", "cpu")
    assert args.epochs == snl_fx.TrainConfig().epochs
    choices = {a.dest: a.choices for a in parser._actions if a.choices}
    hints = typing.get_type_hints(snl_fx.TrainConfig)
    assert choices == {name: typing.get_args(hints[name]) for name in ("schedule", "finetune_schedule")}


def test_softmax_broadcast_is_an_spu_option(capsys):
    from snl_fx.app import cli

    assert cli.snl_fx_main(["pi-bench", "model.onnx", "--softmax-broadcast"]) == 2
    err = capsys.readouterr().err
    assert "--softmax-broadcast is an SPU option" in err and err.count("\n") == 1
