"""Issue 11: bad inputs and faults end in one clear line; every head exports; PI files load."""

from __future__ import annotations

import struct
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper
from torch.utils.data import DataLoader, Dataset, TensorDataset

import snl_fx
from snl_fx._files import load_checked, save_atomic
from snl_fx.app import cli
from snl_fx.train.loop import Checkpoint

LIN = ["linearize", "small_resnet", "--data", "fashion-mnist", "--subset", "64", "--quiet"]


@pytest.fixture
def specs(tmp_path, monkeypatch) -> str:
    """A module of small model factories importable as ``rel_models``."""
    (tmp_path / "rel_models.py").write_text(
        "import torch, torch.nn as nn\n"
        "class WrongHW(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.c = nn.Conv2d(1, 4, 3, padding=1); self.l = nn.Linear(4 * 8 * 8, 3)\n"
        "    def forward(self, x): return self.l(torch.relu(self.c(x)).flatten(1))\n"
        "class DataDep(nn.Module):\n"
        "    def __init__(self): super().__init__(); self.c = nn.Conv2d(1, 4, 3, padding=1)\n"
        "    def forward(self, x):\n"
        "        y = torch.relu(self.c(x))\n"
        "        return y * 2 if y.sum() > 0 else y\n"
        "def wrong_hw(): return WrongHW()\n"
        "def data_dep(): return DataDep()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "rel_models"


def _files(tmp: Path) -> dict[str, Path]:
    (tmp / "a_file").write_text("x")
    (tmp / "a_dir").mkdir()
    (tmp / "junk.onnx").write_bytes(bytes(range(256)) * 3)
    (tmp / "empty.onnx").write_bytes(b"")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    lo = numpy_helper.from_array(np.zeros((), np.float32), "lo")
    graph = helper.make_graph([helper.make_node("Clip", ["x", "lo"], ["y"])], "g", [x], [y], [lo])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, tmp / "ext.onnx", save_as_external_data=True, location="ext.data", size_threshold=0)
    (tmp / "ext.data").unlink()
    ckpt = tmp / "other_arch"
    Checkpoint(ckpt).save({"phase": "gates", "model": {"conv1.weight": torch.zeros(8, 3, 3, 3)}, "budget": 2195})
    return {"file": tmp / "a_file", "dir": tmp / "a_dir", "other": ckpt}


# (main, argv with {placeholders}, words the one-line message must contain)
CLI_CASES = [
    ("snl", LIN + ["--budget", "abc"], ["--budget 'abc'", "5%"]),
    ("snl", LIN + ["--budget", "1,000"], ["--budget '1,000'", "0.05"]),
    ("snl", LIN + ["--budget", "nan"], ["--budget 'nan'"]),
    ("snl", LIN + ["--budget", "150%"], ["--budget '150%'"]),
    ("snl", LIN + ["--budget", "5%", "--lr", "nan"], ["lr must be a number > 0", "nan"]),
    ("snl", LIN + ["--budget", "1e-2", "--device", "tpu"], ["device 'tpu'"]),
    ("snl", LIN + ["--budget", "0.1", "--batch-size", "0"], ["batch_size must be an integer >= 1"]),
    ("snl", LIN + ["--budget", "0.1", "--eps", "nan"], ["eps must be a number in [0, 1)"]),
    ("snl", LIN + ["--budget", "0.1", "--eps", "-1"], ["eps must be a number in [0, 1)"]),
    ("snl", LIN + ["--budget", "0.1", "--epochs", "-1"], ["epochs must be an integer >= 0"]),
    ("snl", LIN + ["--budget", "0.1", "--subset", "-5"], ["--subset must be", ">= 1"]),
    ("snl", LIN + ["--budget", "0.1", "--out", "{file}"], ["is a file, not a folder"]),
    ("snl", LIN + ["--budget", "0.1", "--threads", "0"], ["--threads must be >= 1"]),
    ("snl", ["linearize", "torchvision:resnet18", "--data", "fashion-mnist", "--subset", "64", "--budget", "0.1",
             "--out", "{dir}"], ["does not run on fashion-mnist inputs", "channels"]),
    ("snl", LIN + ["--budget", "2195", "--resume", "--out", "{other}"], ["written for another model", "drop --resume"]),
    ("snl", ["pi-bench", "{dir}/../junk.onnx"], ["not", "ONNX"]),
    ("snl", ["pi-bench", "{dir}/../empty.onnx"], ["not an ONNX model"]),
    ("count", ["{dir}/../ext.onnx"], ["'lo'", "external data"]),
    ("count", ["{dir}"], ["is a directory"]),
    ("count", ["snl_fx.models:small_resnet", "--input-shape", "1,x,16"], ["--input-shape '1,x,16'"]),
    ("count", ["snl_fx.models:small_resnet", "--input-shape", "100000,1,4000,4000"], ["out of memory"]),
    ("count", ["{specs}:wrong_hw", "--input-shape", "1,1,12,12"], ["mat1 and mat2 shapes cannot be multiplied"]),
    ("count", ["{specs}:data_dep", "--input-shape", "1,1,12,12"], ["cannot trace DataDep", "control flow"]),
]


@pytest.mark.parametrize("main,argv,words", CLI_CASES, ids=[" ".join(c[1][-3:]) for c in CLI_CASES])
def test_cli_user_error_is_one_line_and_exit_2(main, argv, words, tmp_path, specs, capfd):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("CUDA present")
    places = {k: str(v) for k, v in _files(tmp_path).items()} | {"specs": specs}
    argv = [a.format(**places) for a in argv]
    capfd.readouterr()
    rc = (cli.snl_fx_main if main == "snl" else cli.relu_count_main)(argv)
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].split(": ")[1] == "error", err
    for word in words:
        assert word in lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_cuda_without_gpu_is_a_user_error(capsys):
    assert cli.snl_fx_main(LIN + ["--budget", "0.1", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_internal_error_says_so_and_debug_shows_traceback(monkeypatch, capsys):
    def broken(args):
        raise ValueError("bug inside")

    monkeypatch.setattr(cli, "_pi_bench", broken)
    assert cli.snl_fx_main(["pi-bench", "x.onnx"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("snl-fx: internal error: ValueError: bug inside") and "\n" not in err
    with pytest.raises(ValueError, match="bug inside"):
        cli.snl_fx_main(["pi-bench", "x.onnx", "--debug"])


def test_a_broken_invariant_is_an_internal_error_not_a_user_error():
    from snl_fx.errors import InternalError
    from snl_fx.lifecycle import _verify

    x = torch.randn(2, 3, 8, 8)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    gm = snl_fx.prepare(model, x)
    lowered = snl_fx.convert(gm)
    _verify(gm, lowered, x, 4 * 6 * 6, torch.device("cpu"))  # holds: all kept
    with pytest.raises(InternalError, match="^lowered model has 144 ReLUs per sample, expected 5$") as info:
        _verify(gm, lowered, x, 5, torch.device("cpu"))
    assert not isinstance(info.value, snl_fx.SnlFxError) and cli._user_error(info.value) is None


def test_broken_pipe_ends_quietly(monkeypatch, capsys):
    def closed_pipe(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "_relu_count", closed_pipe)
    monkeypatch.setattr(sys.stdout, "fileno", lambda: 99999, raising=False)  # the dup2 target must not be pytest's
    monkeypatch.setattr(cli.os, "dup2", lambda *a: None)
    assert cli.relu_count_main(["anything"]) == 141
    assert capsys.readouterr().err == ""


def test_relu_count_json_into_head_exits_without_traceback(tmp_path):
    import subprocess

    cmd = f"'{sys.executable}' -m snl_fx.app.cli count snl_fx.models:small_resnet --input-shape 1,1,28,28 --json | head -1"
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip() == "{"
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


# ---- TrainConfig: (field, value, words of the message)
CONFIG_CASES = [
    ("eps", float("nan"), "eps must be a number in [0, 1), got nan"),
    ("eps", -1.0, "eps must be a number in [0, 1), got -1.0"),
    ("epochs", -1, "epochs must be an integer >= 0, got -1"),
    ("lr", float("inf"), "lr must be a number > 0, got inf"),
    ("kappa", 0.5, "kappa must be a number >= 1, got 0.5"),
    ("batch_size", 0, "batch_size must be an integer >= 1, got 0"),
    ("batch_size", 2.5, "batch_size must be an integer >= 1, got 2.5"),
    ("schedule", "fast", "schedule must be one of"),
    ("kd", "yes", "kd must be True or False"),
    ("device", "tpu", "device 'tpu' is not a torch device"),
]


@pytest.mark.parametrize("field,value,message", CONFIG_CASES)
def test_train_config_refuses_out_of_range(field, value, message):
    with pytest.raises(snl_fx.SnlFxError) as info:
        snl_fx.TrainConfig(**{field: value})
    assert message in str(info.value) and "\n" not in str(info.value)


# ---- linearize's inputs
def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


class _Dicts(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i):
        return {"x": torch.randn(1, 6, 6), "y": 0}


X6 = torch.randn(4, 1, 6, 6)
DATA_CASES = [
    ("dataloader of dicts", DataLoader(_Dicts(), batch_size=4), "is dict; it must be an (input, label) pair"),
    ("dataset of 1-tuples", TensorDataset(torch.randn(8, 1, 6, 6)), "is a 1-tuple; it must be an (input, label) pair"),
    ("wrong sample shape", TensorDataset(torch.randn(8, 1, 5, 5), torch.zeros(8, dtype=torch.long)), "shape (1, 5, 5)"),
    ("float labels", TensorDataset(torch.randn(8, 1, 6, 6), torch.zeros(8)), "not an integer class index"),
    ("empty", TensorDataset(torch.randn(0, 1, 6, 6), torch.zeros(0, dtype=torch.long)), "data is empty"),
]


@pytest.mark.parametrize("name,data,message", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_linearize_refuses_bad_data_before_training(name, data, message):
    with pytest.raises(snl_fx.SnlFxError, match=None) as info:
        snl_fx.linearize(_tiny(), X6, 0.5, data, epochs=1, finetune_epochs=0, progress=False)
    assert message in str(info.value)


def test_skip_must_be_a_list_and_unmatched_patterns_warn():
    with pytest.raises(snl_fx.SnlFxError, match=r"skip must be a list .* not the string '1': use \['1'\]"):
        snl_fx.linearize(_tiny(), X6, 0.5, skip="1")
    with pytest.warns(UserWarning, match=r"skip pattern\(s\) \['nothing\*'\] match no ReLU site"):
        snl_fx.prepare(_tiny(), X6, skip=["nothing*"])


def test_unexportable_model_fails_before_training():
    class Median(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            return torch.relu(self.c(x)).nanmedian(dim=1).values

    data = TensorDataset(torch.randn(8, 1, 8, 8), torch.zeros(8, dtype=torch.long))
    with pytest.raises(snl_fx.SnlFxError, match="would not export .*found before training.*nanmedian"):
        snl_fx.linearize(Median(), torch.randn(2, 1, 8, 8), 0.5, data, epochs=50, progress=False)


# ---- files that can rot
def _flip_tensor_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename)
    n, e = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    raw[info.header_offset + 30 + n + e + 7] ^= 0x01
    path.write_bytes(raw)


@pytest.mark.parametrize("damage,message", [
    (_flip_tensor_byte, "is damaged (checksum mismatch"),
    (lambda p: p.write_bytes(p.read_bytes()[:200]), "is damaged or not a torch file"),
])
def test_damaged_checkpoint_is_one_clear_error(tmp_path, damage, message):
    ckpt = Checkpoint(tmp_path)
    ckpt.save({"model": {"w": torch.randn(300)}, "epoch": 2})
    assert ckpt.load()["epoch"] == 2
    damage(tmp_path / "checkpoint.pt")
    with pytest.raises(snl_fx.SnlFxError) as info:
        ckpt.load()
    text = str(info.value)
    assert message in text and "checkpoint.pt" in text and "drop --resume" in text


def test_damaged_pretrain_cache_is_one_clear_error(tmp_path):
    from snl_fx.app import jobs

    cfg = snl_fx.TrainConfig(batch_size=8, progress=False, device="cpu")
    data = TensorDataset(torch.randn(16, 1, 6, 6), torch.randint(0, 3, (16,)))
    jobs.pretrain(_tiny(), data, None, cfg, 1, cache_dir=tmp_path, cache_key={"k": 1})
    (cache,) = tmp_path.glob("pretrained-*.pt")
    cache.write_bytes(cache.read_bytes()[:100])
    with pytest.raises(snl_fx.SnlFxError, match=rf"{cache.name} is damaged.*delete it to pretrain again"):
        jobs.pretrain(_tiny(), data, None, cfg, 1, cache_dir=tmp_path, cache_key={"k": 1})


def test_atomic_save_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "state.pt"
    save_atomic({"v": torch.ones(3)}, path)
    with pytest.raises(Exception):
        save_atomic({"v": lambda: 0}, path)  # not picklable: fails mid-write
    assert torch.equal(load_checked(path, "n/a")["v"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


# ---- item 1: every pooling / head variant exports, both granularities, both profiles
def _head(kind: str) -> nn.Module:
    torch.manual_seed(0)
    stem = [nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()]
    heads = {
        "adaptive1": [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)],
        "adaptive2": [nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * 2 * 2, 3)],
        "adaptive4": [nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)],
        "maxpool": [nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)],
        "flatten_linear": [nn.Flatten(), nn.Linear(4 * 12 * 12, 3)],
        "global_mean": [_GlobalMean(), nn.Linear(4, 3)],
    }
    return nn.Sequential(*stem, *heads[kind])


class _GlobalMean(nn.Module):
    def forward(self, x):
        return x.mean((2, 3))


@pytest.mark.parametrize("profile", ["default", "pi"])
@pytest.mark.parametrize("granularity", ["pixel", "channel"])
@pytest.mark.parametrize("head", ["adaptive1", "adaptive2", "adaptive4", "maxpool", "flatten_linear", "global_mean"])
def test_every_head_exports(head, granularity, profile, tmp_path):
    x = torch.randn(4, 1, 12, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = snl_fx.linearize(_head(head), x, 0.5, granularity=granularity)
    assert 0 < result.relu_count < result.relu_count_before
    exported = snl_fx.export_onnx(result.model, x[:1], tmp_path / "m.onnx", profile=profile)
    assert exported.max_abs_error <= 1e-4
    assert exported.relu_count == result.relu_count
    assert snl_fx.relu_count(str(exported.path)).total == result.relu_count


# ---- item 2: BatchNorm after no conv -> Mul/Add in the pi profile; CrypTen loads and runs it
def _randomize_bn(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def _pi_runs(model: nn.Module, x: torch.Tensor, fraction: float, tmp_path: Path) -> None:
    from snl_fx.app.pi import import_crypten

    try:
        import_crypten()
    except snl_fx.SnlFxError:
        pytest.skip("CrypTen (the pi extra) is not installed")
    if fraction < 1:
        model = snl_fx.linearize(model, x, fraction).model
    path = tmp_path / f"m{fraction}.onnx"
    exported = snl_fx.export_onnx(model, x[:1], path, profile="pi")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "BatchNormalization" not in ops
    bench = snl_fx.pi_bench(path, runs=1)
    assert bench.relus == exported.relu_count
    assert bench.max_abs_error <= 0.02 * max(1.0, bench.output_scale)


@pytest.mark.parametrize("fraction", [1.0, 0.1])
def test_preactivation_wrn_runs_in_crypten(fraction, tmp_path):
    from snl_fx.app.models import WideResNet

    _pi_runs(_randomize_bn(WideResNet(10, 1, 10)), torch.randn(2, 3, 16, 16), fraction, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("fraction", [1.0, 0.1])
@pytest.mark.parametrize("name", ["small_resnet", "cifar_resnet18", "cifar_resnet34", "wrn22_8", "torchvision:resnet18"])
def test_every_zoo_model_runs_in_crypten(name, fraction, tmp_path):
    from snl_fx.app.models import MODELS

    if name == "torchvision:resnet18":
        import torchvision

        model, x = torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 64, 64)
    elif name == "small_resnet":
        model, x = MODELS[name](), torch.randn(2, 1, 28, 28)
    else:
        model, x = MODELS[name](), torch.randn(2, 3, 32, 32)
    _pi_runs(_randomize_bn(model), x, fraction, tmp_path)
