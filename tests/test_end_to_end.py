"""End to end on tiny generated Fashion-MNIST files: `snl-fx linearize` and the demo entry point."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from test_data import write_fashion

import snl_fx
from snl_fx.app.cli import snl_fx_main
from snl_fx.app.models import small_resnet

ROOT = Path(__file__).resolve().parents[1]
SMALL_RESNET_RELUS = 16 * 28 * 28 * 2 + 32 * 14 * 14 * 2 + 64 * 7 * 7 * 2


@pytest.fixture
def fashion_root(tmp_path: Path) -> Path:
    root = tmp_path / "fm"
    root.mkdir()
    write_fashion(root, 160, "train", seed=0)
    write_fashion(root, 40, "t10k", seed=1)
    return root


def test_snl_fx_linearize_cli_writes_a_loadable_model_and_report(tmp_path, fashion_root, capsys):
    out = tmp_path / "run"
    argv = ["linearize", "small_resnet", "--data", "fashion-mnist", "--data-root", str(fashion_root),
            "--budget", "500", "--epochs", "1", "--finetune-epochs", "1", "--batch-size", "32",
            "--out", str(out), "--json", "--quiet", "--refine"]  # the swaps keep the count exact
    assert snl_fx_main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["relu_count"] == report["onnx_relu_count"] == 500
    assert report["relu_count_before"] == SMALL_RESNET_RELUS
    assert sum(s["after"] for s in report["sites"].values()) == 500
    assert json.loads((out / "report.json").read_text())["relu_count"] == 500
    assert snl_fx.relu_count(out / "model.onnx").total == 500

    # the gated state_dict rebuilds the same lowered model from the original architecture
    x = torch.randn(2, 1, 28, 28)
    state = torch.load(out / "model_state_dict.pt", weights_only=True)
    assert any(k.endswith(".kept") for k in state)
    rebuilt = snl_fx.load_linearized(small_resnet(), x, out / "gated_state_dict.pt")
    assert snl_fx.relu_count(rebuilt, x).total == 500
    rebuilt.load_state_dict(state)  # the lowered state_dict fits the rebuilt lowered graph


def test_snl_fx_linearize_cli_errors_are_one_line(tmp_path, capsys):
    argv = ["linearize", "small_resnet", "--data", "fashion-mnist", "--data-root", str(tmp_path),
            "--budget", "0.05", "--out", str(tmp_path / "o")]
    assert snl_fx_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("snl-fx: error: Fashion-MNIST not found") and err.count("\n") == 1
    assert snl_fx_main(["linearize", "small_resnet", "--data", "cifar10", "--budget", "10"]) == 2
    assert "--data-root" in capsys.readouterr().err


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_entry_point_on_a_tiny_subset(tmp_path, fashion_root):
    out = tmp_path / "demo"
    summary = load_example("fashion_mnist_demo").main(["--quick", "--data-root", str(fashion_root), "--out", str(out)])
    budget = round(0.05 * SMALL_RESNET_RELUS)
    assert summary["relus_before"] == SMALL_RESNET_RELUS
    assert summary["relus_after"] == summary["onnx_relus"] == budget
    for name in ("model.onnx", "report.json", "relus_per_layer.png", "accuracy_vs_relus.png", "summary.json"):
        assert (out / name).stat().st_size > 0, name


def test_own_training_loop_example(tmp_path, fashion_root, capsys):
    load_example("own_training_loop").main(["--data-root", str(fashion_root), "--budget", "500", "--epochs", "1",
                                            "--out", str(tmp_path)])
    assert snl_fx.relu_count(tmp_path / "model.onnx").total == 500
    assert "has 500 ReLUs" in capsys.readouterr().out


def test_torchvision_example(tmp_path):
    load_example("torchvision_model").main(["--model", "resnet18", "--size", "32", "--budget", "1000",
                                            "--out", str(tmp_path)])
    assert snl_fx.relu_count(tmp_path / "resnet18.onnx").total == 1000
