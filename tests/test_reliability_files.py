"""Files (issue 17, group 7): outputs written atomically into a folder that holds only this run's files.

A refused export leaves nothing at its target; an unwritable ``--out`` is refused before any work,
in one line naming ``--out``; an "unchanged" run removes an earlier run's outputs that it does not
write (the pretrain cache stays, and the checkpoint under ``--resume``); the printed and reported
list of outputs names exactly what the run wrote; ``export_onnx`` never changes the caller's input.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from test_data import write_fashion

import snl_fx
import snl_fx.export as export_module
from snl_fx._files import check_writable_dir, file_ids, save_atomic, write_atomic
from snl_fx.app import jobs
from snl_fx.app.cli import snl_fx_main
from snl_fx.errors import SnlFxError

TINY_RELUS = 2 * 7 * 7  # Conv2d(1, 2, 3, stride=4) on 28x28 -> 2x7x7, then one ReLU


@pytest.fixture
def fashion_root(tmp_path: Path) -> Path:
    root = tmp_path / "fm"
    root.mkdir()
    write_fashion(root, 96, "train", seed=0)
    write_fashion(root, 24, "t10k", seed=1)
    return root


@pytest.fixture
def tiny_spec(tmp_path: Path, monkeypatch) -> str:
    """``module:factory`` of a tiny Fashion-MNIST model with 2*7*7 ReLUs, importable by the CLI."""
    (tmp_path / "files_factories.py").write_text(
        "import torch.nn as nn\n"
        "def tiny():\n"
        "    return nn.Sequential(nn.Conv2d(1, 2, 3, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 7 * 7, 10))\n"
        "def misfit():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(5, 10), nn.ReLU())\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "files_factories:tiny"


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 7 * 7, 10))


def linearize_argv(spec: str, root: Path, out: Path, budget: str, *more: str) -> list[str]:
    return ["linearize", spec, "--data", "fashion-mnist", "--data-root", str(root), "--budget", budget,
            "--out", str(out), "--epochs", "1", "--finetune-epochs", "1", "--batch-size", "32", "--quiet",
            "--threads", "2", *more]


def snapshot(folder: Path) -> dict[str, bytes] | None:
    """Every file under ``folder`` with its content (None: no such folder), to show nothing changed."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def earlier_run(out: Path) -> None:
    """Files left in ``out`` by an earlier run: its outputs, a checkpoint, the pretrain cache and a user file."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("model.onnx", "model_state_dict.pt", "gated_state_dict.pt", "report.json", "relus_per_layer.png"):
        (out / name).write_bytes(b"earlier run")
    save_atomic({}, out / "checkpoint.pt")  # a loadable checkpoint: --resume reads it
    (out / "pretrained-0123456789abcdef.pt").write_bytes(b"cache")
    (out / "notes.txt").write_text("mine\n")


def assert_one_line_refusal(code: int, out: str, err: str, *words: str) -> None:
    assert code == 2, err
    assert out == ""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("snl-fx: error: ")
    for word in words:
        assert word in lines[0], lines[0]


# --- export_onnx: the caller's input never changes; a refused export leaves nothing ----------------
class InplaceModule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.relu, self.fc = nn.ReLU(inplace=True), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(x))


class InplaceFunction(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu_(x))


class InplaceMethod(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.relu_()
        return self.fc(x) + 1


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


@pytest.mark.parametrize(
    "model, relus",
    [(InplaceModule, 6), (InplaceFunction, 6), (InplaceMethod, 6), (Plain, 3)],
    ids=["nn.ReLU(inplace)", "torch.relu_", "x.relu_()", "out-of-place"],
)
@pytest.mark.parametrize("profile", ["default", "pi"])
def test_export_never_changes_the_example_input(tmp_path, model, relus, profile):
    torch.manual_seed(0)
    net = model().eval()
    x = torch.randn(4, 6)  # half of it negative: an in-place ReLU on it would show
    kept, state = x.clone(), {k: v.clone() for k, v in net.state_dict().items()}
    result = snl_fx.export_onnx(net, x, tmp_path / "m.onnx", profile=profile)
    assert torch.equal(x, kept)
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert result.relu_count == relus == snl_fx.relu_count(tmp_path / "m.onnx").total
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]  # no temporary file left beside it
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = net(x.clone())
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(x, kept)


def _ort_differs(monkeypatch):
    monkeypatch.setattr(export_module, "_ort_error", lambda *_: 1.0)
    return "ONNX Runtime output differs"


def _count_differs(monkeypatch):
    import snl_fx.inspect

    real = snl_fx.inspect.relu_count
    monkeypatch.setattr(snl_fx.inspect, "relu_count", lambda *a, **k: _plus_one(real(*a, **k)))
    return "ReLUs per sample"


def _plus_one(report):
    class Off:
        total = report.total + 1

    return Off()


def _export_fails(monkeypatch):
    def boom(*_, **__):
        raise SnlFxError("the exporter gave up")

    monkeypatch.setattr(torch.onnx, "export", boom)
    return "the exporter gave up"


@pytest.mark.parametrize("refusal", [_ort_differs, _count_differs, _export_fails])
@pytest.mark.parametrize("target", ["new", "existing", "new-folder"])
def test_a_refused_export_leaves_nothing(tmp_path, monkeypatch, refusal, target):
    path = {"new": tmp_path / "m.onnx", "existing": tmp_path / "m.onnx", "new-folder": tmp_path / "a" / "b" / "m.onnx"}[target]
    if target == "existing":
        path.write_bytes(b"the earlier file")
    before = snapshot(tmp_path)
    words = refusal(monkeypatch)
    with pytest.raises(SnlFxError, match=words):
        snl_fx.export_onnx(Plain(), torch.randn(2, 6), path)
    assert snapshot(tmp_path) == before  # no temporary file, no folder, the earlier file untouched
    assert sorted(os.listdir(tmp_path)) == (["m.onnx"] if target == "existing" else [])


def test_write_atomic_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")

    def half(tmp: Path) -> None:
        tmp.write_bytes(b"ne")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_atomic(target, half)
    assert os.listdir(tmp_path) == ["x.bin"] and target.read_bytes() == b"old"
    write_atomic(target, lambda tmp: tmp.write_bytes(b"new"))
    assert os.listdir(tmp_path) == ["x.bin"] and target.read_bytes() == b"new"


# --- an unwritable --out: refused up front, in one line naming --out ------------------------------
def _out_under_a_file(tmp_path):
    (tmp_path / "plain").write_text("a file\n")
    return tmp_path / "plain" / "run", "cannot be written"


def _out_deeper_under_a_file(tmp_path):
    (tmp_path / "plain").write_text("a file\n")
    return tmp_path / "plain" / "a" / "b", "cannot be written"


def _out_is_a_file(tmp_path):
    (tmp_path / "run.txt").write_text("a file\n")
    return tmp_path / "run.txt", "is a file, not a folder"


def _out_read_only(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into a read-only folder")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    return folder / "run", "cannot be written"


@pytest.mark.parametrize("case", [_out_under_a_file, _out_deeper_under_a_file, _out_is_a_file, _out_read_only])
def test_unwritable_out_is_refused_before_any_work(tmp_path, tiny_spec, monkeypatch, capsys, case):
    out, words = case(tmp_path)
    before = snapshot(tmp_path)

    def no_work(*_, **__):
        raise AssertionError("work started before --out was checked")

    monkeypatch.setattr(jobs, "load_datasets", no_work)
    code = snl_fx_main(linearize_argv(tiny_spec, tmp_path / "no-data", out, "10"))
    assert_one_line_refusal(code, *capsys.readouterr(), "--out", str(out), words)
    assert ".tmp" not in capsys.readouterr().err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_writable_out_passes_the_check_and_is_left_as_it_was(tmp_path, depth):
    folder = tmp_path.joinpath(*[f"d{i}" for i in range(depth)]) / "out"
    if depth == 0:
        folder.mkdir()
    before = snapshot(tmp_path)
    check_writable_dir(folder, "--out")
    assert snapshot(tmp_path) == before
    assert folder.is_dir() == (depth == 0)  # folders created for the probe are gone again
    assert sorted(p.name for p in tmp_path.rglob("*")) == (["out"] if depth == 0 else [])


@pytest.mark.parametrize("case", [_out_under_a_file, _out_deeper_under_a_file, _out_is_a_file])
def test_check_writable_dir_refuses_in_one_line(tmp_path, case):
    out, words = case(tmp_path)
    with pytest.raises(SnlFxError, match=words) as err:
        check_writable_dir(out, "out_dir")
    assert str(err.value).startswith(f"out_dir {out} ") and "\n" not in str(err.value)


def _pretrain_into(folder: Path) -> None:
    data = torch.utils.data.TensorDataset(torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,)))
    cfg = snl_fx.TrainConfig(batch_size=8, progress=False, device="cpu")
    jobs.pretrain(tiny_model(), data, None, cfg, 1, cache_dir=folder, cache_key={"k": 1})


def _write_outputs_into(folder: Path) -> None:
    x = torch.randn(4, 1, 28, 28)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nothing to remove: the model is returned unchanged
        result = snl_fx.linearize(tiny_model(), x, 10_000)
    jobs.write_outputs(result, x, folder)


@pytest.mark.parametrize("case", [_out_under_a_file, _out_deeper_under_a_file, _out_is_a_file])
@pytest.mark.parametrize("job, what", [(_pretrain_into, "the pretrain cache folder"),
                                       (_write_outputs_into, "the output folder")])
def test_library_jobs_refuse_an_unwritable_folder_before_work(tmp_path, monkeypatch, case, job, what):
    out, words = case(tmp_path)
    before = snapshot(tmp_path)

    def no_training(*_, **__):
        raise AssertionError("trained before the cache folder was checked")

    monkeypatch.setattr(jobs, "train_epoch", no_training)
    with pytest.raises(SnlFxError, match=words) as err:
        job(out)
    assert str(err.value).startswith(what) and str(out) in str(err.value) and ".tmp" not in str(err.value)
    assert snapshot(tmp_path) == before


# --- refused CLI runs: exit code 2, one line, nothing written or changed --------------------------
REFUSED = {  # name: (factory, budget, more options, words of the one line)
    "bad budget": ("tiny", "lots", [], ["--budget 'lots'"]),
    "negative pretrain": ("tiny", "10", ["--pretrain-epochs", "-1"], ["--pretrain-epochs"]),
    "empty subset": ("tiny", "10", ["--subset", "0"], ["--subset"]),
    "missing weights": ("tiny", "10", ["--weights", "/nonexistent/w.pt"], ["--weights"]),
    "model misfits the data": ("misfit", "10", [], ["does not run on fashion-mnist"]),
    "zero threads": ("tiny", "10", ["--threads", "0"], ["--threads"]),
}


@pytest.mark.parametrize("folder", ["absent", "earlier run"])
@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_runs_write_nothing(tmp_path, fashion_root, tiny_spec, capsys, case, folder):
    factory, budget, more, words = REFUSED[case]
    out = tmp_path / "run"
    if folder == "earlier run":
        earlier_run(out)
    before = snapshot(out)
    code = snl_fx_main(linearize_argv(tiny_spec.replace("tiny", factory), fashion_root, out, budget, *more))
    assert_one_line_refusal(code, *capsys.readouterr(), *words)
    assert snapshot(out) == before


def test_a_refused_export_at_the_end_of_a_run_changes_nothing(tmp_path, monkeypatch):
    out = tmp_path / "run"
    earlier_run(out)
    x = torch.randn(8, 1, 28, 28)
    model = tiny_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nothing to remove: the model is returned unchanged
        result = snl_fx.linearize(model, x, 10_000)
    assert result.gated is None
    before = snapshot(out)
    _ort_differs(monkeypatch)
    with pytest.raises(SnlFxError, match="ONNX Runtime output differs"):
        jobs.write_outputs(result, x, out, before=file_ids(out))
    assert snapshot(out) == before  # neither the earlier run's files removed nor any new one written


# --- a run into a folder of an earlier run: only this run's files are left ------------------------
def _listed(out_text: str, out: Path) -> list[str]:
    (line,) = [li for li in out_text.splitlines() if li.startswith(f"outputs in {out}: ")]
    return line.split(": ", 1)[1].split(", ")


@pytest.mark.parametrize(
    "resume, budget, kept",
    [
        (False, "10000", ["model.onnx", "model_state_dict.pt", "report.json", "relus_per_layer.png"]),
        (True, "10000", ["model.onnx", "model_state_dict.pt", "report.json", "relus_per_layer.png"]),
        (False, "40", ["model.onnx", "model_state_dict.pt", "gated_state_dict.pt", "report.json",
                       "relus_per_layer.png", "checkpoint.pt"]),
    ],
    ids=["unchanged", "unchanged --resume", "linearized"],
)
def test_a_run_leaves_only_its_own_files(tmp_path, fashion_root, tiny_spec, capsys, resume, budget, kept):
    out = tmp_path / "run"
    earlier_run(out)
    argv = linearize_argv(tiny_spec, fashion_root, out, budget, *(["--resume"] if resume else []))
    assert snl_fx_main(argv) == 0, capsys.readouterr().err
    listed = _listed(capsys.readouterr().out, out)
    assert listed == kept
    report = json.loads((out / "report.json").read_text())
    assert report["outputs"] == kept
    expected = set(kept) | {"pretrained-0123456789abcdef.pt", "notes.txt"}  # the cache and the user's file stay
    if resume:
        expected.add("checkpoint.pt")  # --resume: the checkpoint stays, though this run did not write it
    assert set(os.listdir(out)) == expected
    for name in kept:
        assert (out / name).read_bytes() != b"earlier run", name
    relus = min(int(budget), TINY_RELUS)
    assert report["relu_count"] == report["onnx_relu_count"] == relus
    assert snl_fx.relu_count(out / "model.onnx").total == relus
    assert (report["method"] == "unchanged") == (int(budget) >= TINY_RELUS)


def test_a_trained_run_then_an_unchanged_one_with_the_pretrain_cache(tmp_path, fashion_root, tiny_spec, capsys):
    out = tmp_path / "run"
    first = linearize_argv(tiny_spec, fashion_root, out, "40", "--pretrain-epochs", "1", "--json")
    assert snl_fx_main(first) == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    cache = sorted(p.name for p in out.glob("pretrained-*"))
    assert [p for p in cache if p.endswith(".pt")] and report["outputs"] == [
        "model.onnx", "model_state_dict.pt", "gated_state_dict.pt", "report.json", "relus_per_layer.png",
        "checkpoint.pt", *cache,
    ]
    assert set(os.listdir(out)) == set(report["outputs"])
    cached = {name: (out / name).stat().st_mtime_ns for name in cache}

    second = linearize_argv(tiny_spec, fashion_root, out, "10000", "--pretrain-epochs", "1", "--json")
    assert snl_fx_main(second) == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "unchanged"
    assert report["outputs"] == ["model.onnx", "model_state_dict.pt", "report.json", "relus_per_layer.png"]
    assert set(os.listdir(out)) == set(report["outputs"]) | set(cache)  # stale gated state and checkpoint gone
    assert {name: (out / name).stat().st_mtime_ns for name in cache} == cached  # the cache reused, not rewritten
