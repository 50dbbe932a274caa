"""Data loaders on tiny files written in the real formats, their errors, and the val split."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from snl_fx import SnlFxError
from snl_fx.app import jobs
from snl_fx.app.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    DATASETS,
    FASHION_MNIST_DIR,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    cifar,
    fashion_mnist,
    split_train_val,
    tiny_imagenet,
)

# --------------------------------------------------------------------------- Fashion-MNIST


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    data = idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def write_fashion(root: Path, n: int, prefix: str = "train", gz: bool = True, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    write_idx(root / f"{prefix}-images-idx3-ubyte", images, gz)
    write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, gz)
    return images, labels


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx(tmp_path: Path, gz: bool) -> None:
    images, labels = write_fashion(tmp_path, 5, "t10k", gz=gz)
    ds = fashion_mnist(tmp_path, train=False)
    assert isinstance(ds, TensorDataset)
    x, y = ds.tensors
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.tolist() == labels.tolist()
    expected = (torch.from_numpy(images).float() / 255 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    torch.testing.assert_close(x[:, 0], expected)


def test_fashion_mnist_missing(tmp_path: Path) -> None:
    with pytest.raises(SnlFxError, match="apt-get install dataset-fashion-mnist") as err:
        fashion_mnist(tmp_path)
    assert "train-images-idx3-ubyte" in str(err.value)
    write_fashion(tmp_path, 3, "t10k")
    with pytest.raises(SnlFxError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist(tmp_path, train=True)  # only the test split is there


def test_fashion_mnist_bad_magic(tmp_path: Path) -> None:
    write_fashion(tmp_path, 3, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    raw = bytearray(path.read_bytes())
    raw[3] = 1  # claims one dim
    path.write_bytes(bytes(raw))
    with pytest.raises(SnlFxError, match="magic") as err:
        fashion_mnist(tmp_path)
    assert str(path) in str(err.value)


def test_fashion_mnist_wrong_size(tmp_path: Path) -> None:
    write_fashion(tmp_path, 3, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-10]))
    with pytest.raises(SnlFxError, match="corrupt idx file") as err:
        fashion_mnist(tmp_path)
    assert str(path) in str(err.value)


def test_fashion_mnist_not_gzip(tmp_path: Path) -> None:
    write_fashion(tmp_path, 3, gz=True)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(b"this is not gzip data at all")
    with pytest.raises(SnlFxError) as err:
        fashion_mnist(tmp_path)
    assert str(path) in str(err.value)


def test_fashion_mnist_count_mismatch(tmp_path: Path) -> None:
    write_fashion(tmp_path, 3, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(4, np.uint8), gz=False)
    with pytest.raises(SnlFxError, match="3 images.*4 labels"):
        fashion_mnist(tmp_path)


@pytest.mark.skipif(
    not os.path.isfile(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")),
    reason="Debian package dataset-fashion-mnist is not installed",
)
def test_fashion_mnist_debian() -> None:
    train, test = fashion_mnist(), fashion_mnist(train=False)
    assert len(train) == 60_000 and len(test) == 10_000
    assert train.tensors[0].shape == (60_000, 1, 28, 28)
    assert torch.bincount(train.tensors[1]).tolist() == [6000] * 10
    assert abs(train.tensors[0].mean().item()) < 0.01 and abs(train.tensors[0].std().item() - 1) < 0.01


# --------------------------------------------------------------------------- CIFAR


def cifar_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


def write_pickle(path: Path, obj: object, protocol: int) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def write_cifar10(root: Path, per_batch: int = 2) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        data = cifar_images(per_batch, i)
        # bytes keys and protocol 2 as in the original python-2 pickles, str keys and protocol 5 too
        if i % 2:
            entry = {b"batch_label": b"x", b"data": data, b"labels": [(i + j) % 10 for j in range(per_batch)]}
        else:
            entry = {"batch_label": "x", "data": data, "labels": [(i + j) % 10 for j in range(per_batch)]}
        write_pickle(folder / f"data_batch_{i}", entry, 2 if i % 2 else 5)
    write_pickle(folder / "test_batch", {"data": cifar_images(3, 9), "labels": [7, 8, 9]}, 4)
    return folder


def test_cifar10(tmp_path: Path) -> None:
    folder = write_cifar10(tmp_path)
    for root in (tmp_path, folder):  # parent folder or the batch folder itself
        train = cifar(root)
        assert len(train) == 10
        x, y = train[0]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert train.labels.tolist() == [(i + j) % 10 for i in range(1, 6) for j in range(2)]
        raw = torch.from_numpy(cifar_images(2, 1)[0].reshape(3, 32, 32)).float() / 255
        mean, std = torch.tensor(CIFAR10_MEAN).view(3, 1, 1), torch.tensor(CIFAR10_STD).view(3, 1, 1)
        torch.testing.assert_close(x, (raw - mean) / std)
    test = cifar(tmp_path, train=False)
    assert len(test) == 3 and test.labels.tolist() == [7, 8, 9]


def test_cifar_augment(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    plain, augmented = cifar(tmp_path), cifar(tmp_path, augment=True)
    torch.manual_seed(0)
    draws = [augmented[0][0] for _ in range(20)]
    assert all(d.shape == (3, 32, 32) and d.dtype == torch.float32 for d in draws)
    assert any(not torch.equal(d, plain[0][0]) for d in draws)
    assert torch.equal(augmented[0][1], plain[0][1])


def test_cifar100(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    write_pickle(folder / "train", {"data": cifar_images(4, 0), "fine_labels": [0, 99, 42, 5], "coarse_labels": [0, 19, 1, 2]}, 2)
    write_pickle(folder / "test", {b"data": cifar_images(2, 1), b"fine_labels": [3, 4], b"coarse_labels": [0, 0]}, 5)
    train = cifar(tmp_path, num_classes=100)
    assert len(train) == 4 and train.labels.tolist() == [0, 99, 42, 5]
    assert train[1][0].shape == (3, 32, 32)
    test = cifar(folder, num_classes=100, train=False)
    assert test.labels.tolist() == [3, 4]


class Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes like python 2 did for the original CIFAR files: bytes as py2 str, numpy.core names."""

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_bytes(self, obj: bytes) -> None:
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    def save_builtin(self, obj, name=None) -> None:
        module = getattr(obj, "__module__", "") or ""
        if module.startswith("numpy._core"):
            module = "numpy.core" + module[len("numpy._core") :]
            self.write(pickle.GLOBAL + f"{module}\n{obj.__name__}\n".encode())
            self.memoize(obj)
        else:
            self.save_global(obj, name)

    dispatch[bytes] = save_bytes
    dispatch[type(len)] = save_builtin


def test_cifar_python2_pickle(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = cifar_images(3, 5)
    with open(folder / "test", "wb") as f:
        Py2Pickler(f, protocol=2).dump({b"data": data, b"fine_labels": [1, 2, 3], b"coarse_labels": [0, 0, 0]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy.core deprecation warning
        test = cifar(tmp_path, num_classes=100, train=False)
    assert test.labels.tolist() == [1, 2, 3]
    assert torch.equal(test.images, torch.from_numpy(data.reshape(3, 3, 32, 32)))


def test_cifar_missing(tmp_path: Path) -> None:
    with pytest.raises(SnlFxError, match="cifar-10-batches-py"):
        cifar(tmp_path)
    with pytest.raises(SnlFxError, match="cifar-100-python"):
        cifar(tmp_path, num_classes=100)
    with pytest.raises(SnlFxError, match="10 or 100"):
        cifar(tmp_path, num_classes=20)
    folder = write_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(SnlFxError, match="data_batch_3"):
        cifar(tmp_path)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize(
    "content, message",
    [
        (b"garbage, not a pickle", "cannot unpickle"),
        (pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}), "expected uint8"),
        (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0]}), "expected 2 integers"),
        (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}), "labels outside"),
        (pickle.dumps({"pixels": 1}), "needs keys"),
        (pickle.dumps([1, 2]), "dict"),
        (pickle.dumps({"data": _Evil(), "labels": [0]}), "refusing to load builtins.print"),
    ],
)
def test_cifar_corrupt(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, message: str) -> None:
    folder = write_cifar10(tmp_path)
    (folder / "test_batch").write_bytes(content)
    with pytest.raises(SnlFxError, match=message) as err:
        cifar(tmp_path, train=False)
    assert str(folder / "test_batch") in str(err.value)
    assert "never run" not in capsys.readouterr().out


# --------------------------------------------------------------------------- Tiny-ImageNet

WNIDS = ["n09999999", "n01111111"]  # not sorted: class index follows wnids.txt
COLOURS = {"n09999999": (250, 10, 10), "n01111111": (10, 10, 250)}


def write_tiny(parent: Path) -> Path:
    from PIL import Image

    root = parent / "tiny-imagenet-200"
    root.mkdir()
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    for wnid in WNIDS:
        folder = root / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (64, 64), COLOURS[wnid]).save(folder / f"{wnid}_{k}.JPEG")
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    for k, wnid in enumerate([WNIDS[1], WNIDS[0], WNIDS[1]]):
        Image.new("RGB", (64, 64), COLOURS[wnid]).save(root / "val" / "images" / f"val_{k}.JPEG")
        lines.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t63\t63")
    Image.new("L", (64, 64), 128).save(root / "val" / "images" / "val_3.JPEG")  # grayscale, as some real ones
    lines.append(f"val_3.JPEG\t{WNIDS[0]}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


def test_tiny_imagenet(tmp_path: Path) -> None:
    root = write_tiny(tmp_path)
    for where in (root, tmp_path):
        train = tiny_imagenet(where)
        assert len(train) == 4 and train.classes == WNIDS
        assert train.labels.tolist() == [0, 0, 1, 1]
        for i in range(4):
            x, y = train[i]
            assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and y.dtype == torch.int64
            red, blue = train.load_image(i)[[0, 2]].float().mean(dim=(1, 2))
            assert (red > blue) == (int(y) == 0)  # the class-0 images are red
    val = tiny_imagenet(root, train=False)
    assert val.labels.tolist() == [1, 0, 1, 0]
    grey = val.load_image(3)
    assert grey.shape == (3, 64, 64) and torch.equal(grey[0], grey[1])
    augmented = tiny_imagenet(root, train=False, augment=True)
    assert augmented[0][0].shape == (3, 64, 64)


def test_tiny_imagenet_missing(tmp_path: Path) -> None:
    with pytest.raises(SnlFxError, match="wnids.txt"):
        tiny_imagenet(tmp_path)
    root = write_tiny(tmp_path)
    (root / "val" / "val_annotations.txt").unlink()
    with pytest.raises(SnlFxError, match="val_annotations.txt"):
        tiny_imagenet(root, train=False)
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn00000000\t0 0 1 1\n")
    with pytest.raises(SnlFxError, match="line 1"):
        tiny_imagenet(root, train=False)
    (root / "val" / "val_annotations.txt").write_text(f"val_9.JPEG\t{WNIDS[0]}\t0 0 1 1\n")
    with pytest.raises(SnlFxError, match="val_9.JPEG"):
        tiny_imagenet(root, train=False)
    for image in (root / "train" / WNIDS[1] / "images").iterdir():
        image.unlink()
    with pytest.raises(SnlFxError, match="no JPEG images"):
        tiny_imagenet(root)


def test_tiny_imagenet_corrupt_image(tmp_path: Path) -> None:
    root = write_tiny(tmp_path)
    bad = root / "train" / WNIDS[0] / "images" / f"{WNIDS[0]}_1.JPEG"
    bad.write_bytes(b"not a jpeg")
    train = tiny_imagenet(root)
    with pytest.raises(SnlFxError) as err:
        train[1]
    assert str(bad) in str(err.value)


# --------------------------------------------------------------------------- split


def test_split_train_val() -> None:
    data = TensorDataset(torch.arange(100))
    train, val = split_train_val(data, 0.1, seed=3)
    assert len(train) == 90 and len(val) == 10
    assert set(train.indices).isdisjoint(val.indices)
    assert sorted(train.indices + val.indices) == list(range(100))
    again_train, again_val = split_train_val(data, 0.1, seed=3)
    assert again_train.indices == train.indices and again_val.indices == val.indices
    assert split_train_val(data, 0.1, seed=4)[1].indices != val.indices
    assert [int(val[i][0]) for i in range(len(val))] == val.indices
    with pytest.raises(SnlFxError, match="val_fraction"):
        split_train_val(data, 1.0)
    with pytest.raises(SnlFxError, match="cannot split"):
        split_train_val(TensorDataset(torch.arange(1)), 0.5)


# --------------------------------------------------------------------------- registry


def test_registry_loads_each_split_and_sizes_the_zoo_models(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    train, test = jobs.load_datasets("cifar10", str(tmp_path))
    assert (len(train), len(test)) == (10, 3) and train[0][0].shape == DATASETS["cifar10"].shape
    assert test.labels.tolist() == [7, 8, 9]
    with pytest.raises(SnlFxError, match="--data-root"):
        jobs.load_datasets("cifar100")
    with pytest.raises(SnlFxError, match="unknown data set 'mnist'; known: fashion-mnist, cifar10"):
        jobs.load_datasets("mnist")
    for name, spec in DATASETS.items():
        model = jobs.build_model("small_resnet", name).eval()
        with torch.no_grad():
            assert model(torch.zeros((2,) + spec.shape)).shape == (2, spec.classes)
