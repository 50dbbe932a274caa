"""Image data sets read from local files only: nothing here ever downloads.

* :func:`fashion_mnist`: the idx files of Debian's ``dataset-fashion-mnist`` package (or any
  folder holding the four idx files, gzipped or not).
* :func:`cifar`: CIFAR-10/100 in torchvision's "python pickle batches" folder format.
* :func:`tiny_imagenet`: the standard ``tiny-imagenet-200`` folder.
* :func:`split_train_val`: a fixed-seed validation split carved out of a training set (the
  library's, which ``linearize`` uses to hold out 10%).
* :data:`DATASETS`: the data sets above by name (sample shape, classes, loader), as the CLI's
  ``--data`` takes them.

Missing or malformed files raise :class:`~snl_fx.SnlFxError` with a one-line explanation
naming the file and, where it helps, the expected layout.
"""

from __future__ import annotations

import gzip
import importlib
import os
import pickle
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from snl_fx.errors import SnlFxError
from snl_fx.train.loop import split_train_val

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "DATASETS",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "DataSetSpec",
    "TINY_IMAGENET_MEAN",
    "TINY_IMAGENET_STD",
    "ImageTensorDataset",
    "TinyImageNet",
    "cifar",
    "fashion_mnist",
    "split_train_val",
    "tiny_imagenet",
]

PathLike = str | os.PathLike

#: Where ``apt-get install dataset-fashion-mnist`` puts the four gzipped idx files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

# Per-channel mean and per-pixel standard deviation over the training sets.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
TINY_IMAGENET_MEAN = (0.4802, 0.4481, 0.3975)
TINY_IMAGENET_STD = (0.2770, 0.2691, 0.2821)


# --------------------------------------------------------------------------- Fashion-MNIST


def _find_idx(root: str, stem: str) -> str | None:
    for name in (stem + ".gz", stem):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    return None


def _read_idx(path: str, ndim: int) -> np.ndarray:
    """Read an unsigned-byte idx file (gzipped when its name ends in .gz) into a numpy array."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            with open(path, "rb") as f:
                raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise SnlFxError(f"cannot read idx file {path}: {e}") from e
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:4] != bytes([0, 0, 0x08, ndim]):
        raise SnlFxError(
            f"corrupt idx file {path}: bad magic number {raw[:4].hex() or '(empty)'}, "
            f"expected 000008{ndim:02x} (unsigned bytes, {ndim} dims)"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise SnlFxError(
            f"corrupt idx file {path}: header says shape {dims} ({expected} bytes), file has {len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def fashion_mnist(root: PathLike | None = None, train: bool = True) -> TensorDataset:
    """Fashion-MNIST as a ``TensorDataset`` of normalised float images (N,1,28,28) and int64 labels.

    ``root`` defaults to :data:`FASHION_MNIST_DIR`; it must hold ``{train,t10k}-images-idx3-ubyte``
    and ``{train,t10k}-labels-idx1-ubyte``, each gzipped (``.gz``) or plain.
    """
    root = FASHION_MNIST_DIR if root is None else os.fspath(root)
    prefix = "train" if train else "t10k"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    paths = [_find_idx(root, s) for s in stems]
    if None in paths:
        missing = [s for s, p in zip(stems, paths) if p is None]
        raise SnlFxError(
            f"Fashion-MNIST not found: no {' or '.join(m + '[.gz]' for m in missing)} in {root}; "
            f"install it with `apt-get install dataset-fashion-mnist` (files go to {FASHION_MNIST_DIR}) "
            "or pass the folder holding the idx files"
        )
    images_path, labels_path = paths
    images = _read_idx(images_path, 3)
    labels = _read_idx(labels_path, 1)
    if images.shape[1:] != (28, 28):
        raise SnlFxError(f"corrupt idx file {images_path}: images are {images.shape[1:]}, expected 28x28")
    if len(images) != len(labels):
        raise SnlFxError(
            f"Fashion-MNIST files disagree: {images_path} has {len(images)} images, "
            f"{labels_path} has {len(labels)} labels"
        )
    if labels.size and int(labels.max()) > 9:
        raise SnlFxError(f"corrupt idx file {labels_path}: label {int(labels.max())} is not in 0..9")
    x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1)
    x.mul_(1.0 / 255.0).sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)
    y = torch.from_numpy(labels.astype(np.int64))
    return TensorDataset(x, y)


# --------------------------------------------------------------------------- tensor image data sets


def _augmenter(size: int) -> Any:
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip()])


class ImageTensorDataset(Dataset):
    """uint8 images (N,3,H,W) held in memory, normalised (and optionally augmented) per item.

    Items are ``(float image (3,H,W), int64 label)``. ``images`` and ``labels`` stay available
    for whole-tensor use.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool = False,
    ) -> None:
        self.images = images
        self.labels = labels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.augment = augment
        self._augment = _augmenter(images.shape[-1]) if augment else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[index]
        if self._augment is not None:
            x = self._augment(x)
        x = (x.float() / 255.0 - self.mean) / self.std
        return x, self.labels[index]


# --------------------------------------------------------------------------- CIFAR


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts of numpy arrays and lists, and refuses any other global (no code runs)."""

    _ALLOWED = {
        "numpy": {"ndarray", "dtype"},
        "numpy.core.multiarray": {"_reconstruct", "scalar"},
        "numpy._core.multiarray": {"_reconstruct", "scalar"},
        "numpy.core.numeric": {"_frombuffer"},
        "numpy._core.numeric": {"_frombuffer"},
        "_codecs": {"encode"},
    }

    def find_class(self, module: str, name: str) -> Any:
        allowed = name in self._ALLOWED.get(module, ()) or (module == "numpy.dtypes" and name.endswith("DType"))
        if not allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core."):  # numpy 2 renamed numpy.core to numpy._core
            try:
                return getattr(importlib.import_module("numpy._core." + module[len("numpy.core.") :]), name)
            except ImportError:
                pass
        return getattr(importlib.import_module(module), name)


_CIFAR_LAYOUT = {
    10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"),
    100: ("cifar-100-python", ["train"], ["test"], "fine_labels"),
}


def _cifar_layout_text(num_classes: int) -> str:
    folder, train_files, test_files, _ = _CIFAR_LAYOUT[num_classes]
    return f"{folder}/{{{','.join(train_files + test_files)}}}"


def _load_cifar_batch(path: str, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            entry = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except Exception as e:  # any unpickling failure means a corrupt or foreign file
        raise SnlFxError(f"corrupt CIFAR batch {path}: cannot unpickle it ({type(e).__name__}: {e})") from e
    if not isinstance(entry, dict):
        raise SnlFxError(f"corrupt CIFAR batch {path}: expected a pickled dict, got {type(entry).__name__}")
    entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    data, labels = entry.get("data"), entry.get(label_key)
    if data is None or labels is None:
        raise SnlFxError(f"corrupt CIFAR batch {path}: needs keys 'data' and {label_key!r}, has {sorted(entry)}")
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise SnlFxError(
            f"corrupt CIFAR batch {path}: 'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)"
        )
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise SnlFxError(
            f"corrupt CIFAR batch {path}: {label_key!r} has shape {labels.shape}, expected {data.shape[0]} integers"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise SnlFxError(f"corrupt CIFAR batch {path}: labels outside 0..{num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def cifar(root: PathLike, num_classes: int = 10, train: bool = True, augment: bool = False) -> ImageTensorDataset:
    """CIFAR-10 or CIFAR-100 from torchvision's python-pickle folder, normalised.

    ``root`` is the folder holding ``cifar-10-batches-py`` / ``cifar-100-python``, or that
    batch folder itself. ``augment=True`` adds a random 32x32 crop of the image padded by 4 and
    a random horizontal flip, applied per item to the tensor before normalisation. CIFAR-100
    uses the 100 fine labels. torchvision's own class is not used because its MD5 check
    rejects anything but the original files.
    """
    if num_classes not in _CIFAR_LAYOUT:
        raise SnlFxError(f"CIFAR has 10 or 100 classes, got num_classes={num_classes}")
    root = os.fspath(root)
    folder, train_files, test_files, label_key = _CIFAR_LAYOUT[num_classes]
    base = os.path.join(root, folder) if os.path.isdir(os.path.join(root, folder)) else root
    files = train_files if train else test_files
    missing = [name for name in files if not os.path.isfile(os.path.join(base, name))]
    if missing:
        raise SnlFxError(
            f"CIFAR-{num_classes} not found: missing {', '.join(missing)} in {base}; expected "
            f"{_cifar_layout_text(num_classes)} (torchvision's python version, unpacked) under {root}"
        )
    batches = [_load_cifar_batch(os.path.join(base, name), label_key, num_classes) for name in files]
    images = torch.from_numpy(np.concatenate([b[0] for b in batches]))
    labels = torch.from_numpy(np.concatenate([b[1] for b in batches]))
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if num_classes == 10 else (CIFAR100_MEAN, CIFAR100_STD)
    return ImageTensorDataset(images, labels, mean, std, augment)


# --------------------------------------------------------------------------- Tiny-ImageNet

_TINY_LAYOUT = "wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG and val/val_annotations.txt"


def _is_jpeg(name: str) -> bool:
    return name.lower().endswith((".jpeg", ".jpg"))


class TinyImageNet(Dataset):
    """Tiny-ImageNet images read lazily from their JPEG files; items are ``(float (3,64,64), int64 label)``."""

    def __init__(self, samples: list[tuple[str, int]], classes: list[str], augment: bool = False) -> None:
        self.samples = samples
        self.classes = classes
        self.labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
        self.mean = torch.tensor(TINY_IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(TINY_IMAGENET_STD).view(3, 1, 1)
        self.augment = augment
        self._augment = _augmenter(64) if augment else None

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int) -> torch.Tensor:
        """The uint8 (3,64,64) image of sample ``index`` (grayscale files are made RGB)."""
        from PIL import Image

        path = self.samples[index][0]
        try:
            with Image.open(path) as img:
                arr = np.asarray(img.convert("RGB"))
        except Exception as e:  # PIL raises a variety of errors on broken files
            raise SnlFxError(f"cannot read Tiny-ImageNet image {path}: {e}") from e
        if arr.shape != (64, 64, 3):
            raise SnlFxError(f"Tiny-ImageNet image {path} is {arr.shape[1]}x{arr.shape[0]}, expected 64x64")
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.load_image(index)
        if self._augment is not None:
            x = self._augment(x)
        x = (x.float() / 255.0 - self.mean) / self.std
        return x, self.labels[index]


def tiny_imagenet(root: PathLike, train: bool = True, augment: bool = False) -> TinyImageNet:
    """Tiny-ImageNet (200 classes, 64x64 RGB) from its standard folder; ``train=False`` is the val split.

    ``root`` is the ``tiny-imagenet-200`` folder (or its parent). Class ``i`` is line ``i`` of
    ``wnids.txt``. Images are decoded when an item is read; ``augment=True`` adds a random
    64x64 crop padded by 4 and a random horizontal flip.
    """
    root = os.fspath(root)
    if not os.path.isfile(os.path.join(root, "wnids.txt")) and os.path.isfile(
        os.path.join(root, "tiny-imagenet-200", "wnids.txt")
    ):
        root = os.path.join(root, "tiny-imagenet-200")
    wnids_path = os.path.join(root, "wnids.txt")
    if not os.path.isfile(wnids_path):
        raise SnlFxError(f"Tiny-ImageNet not found: no wnids.txt in {root}; expected {_TINY_LAYOUT}")
    with open(wnids_path, encoding="utf-8") as f:
        classes = [line.strip() for line in f if line.strip()]
    if not classes:
        raise SnlFxError(f"corrupt Tiny-ImageNet file {wnids_path}: no class ids")
    index = {wnid: i for i, wnid in enumerate(classes)}
    samples: list[tuple[str, int]] = []
    if train:
        for wnid in classes:
            folder = os.path.join(root, "train", wnid, "images")
            if not os.path.isdir(folder):
                raise SnlFxError(f"Tiny-ImageNet not complete: missing folder {folder}; expected {_TINY_LAYOUT}")
            names = sorted(n for n in os.listdir(folder) if _is_jpeg(n))
            if not names:
                raise SnlFxError(f"Tiny-ImageNet not complete: no JPEG images in {folder}")
            samples.extend((os.path.join(folder, n), index[wnid]) for n in names)
    else:
        folder = os.path.join(root, "val", "images")
        annotations = os.path.join(root, "val", "val_annotations.txt")
        if not os.path.isdir(folder) or not os.path.isfile(annotations):
            raise SnlFxError(
                f"Tiny-ImageNet val split not found: need {folder} and {annotations}; expected {_TINY_LAYOUT}"
            )
        present = set(os.listdir(folder))
        with open(annotations, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                fields = line.split()
                if not fields:
                    continue
                if len(fields) < 2 or fields[1] not in index:
                    raise SnlFxError(
                        f"corrupt Tiny-ImageNet file {annotations} line {lineno}: "
                        "expected '<file> <wnid> ...' with a wnid listed in wnids.txt"
                    )
                if fields[0] not in present:
                    raise SnlFxError(f"Tiny-ImageNet not complete: {annotations} lists {fields[0]}, not in {folder}")
                samples.append((os.path.join(folder, fields[0]), index[fields[1]]))
        if not samples:
            raise SnlFxError(f"corrupt Tiny-ImageNet file {annotations}: no annotations")
    return TinyImageNet(samples, classes, augment)


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class DataSetSpec:
    """A data set by name: one sample's shape, its number of classes, and its loader.

    ``load(root, train)`` reads one split (the training split augmented); ``needs_root``: the
    files are read from a folder the user gives (Fashion-MNIST has a default, the Debian package).
    """

    shape: tuple[int, ...]
    classes: int
    load: Callable[[PathLike | None, bool], Dataset]
    needs_root: bool = True


DATASETS: dict[str, DataSetSpec] = {
    "fashion-mnist": DataSetSpec((1, 28, 28), 10, lambda root, train: fashion_mnist(root, train), needs_root=False),
    "cifar10": DataSetSpec((3, 32, 32), 10, lambda root, train: cifar(root, 10, train, augment=train)),
    "cifar100": DataSetSpec((3, 32, 32), 100, lambda root, train: cifar(root, 100, train, augment=train)),
    "tiny-imagenet": DataSetSpec((3, 64, 64), 200, lambda root, train: tiny_imagenet(root, train, augment=train)),
}
