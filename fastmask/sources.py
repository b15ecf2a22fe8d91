"""Where each dataset's raw images come from, and the readers of their file formats.

A source returns ``Raw``: train and test images as float32 ``[N, C, H, W]`` in [0, 1] with int64
labels; ``fastmask.data.load`` turns it into normalised splits on the device. Nothing is
downloaded: every dataset but ``digits`` and ``synthetic`` is read from a local folder,
``root=`` or ``$FASTMASK_DATA``.

- ``digits``: scikit-learn's 8x8 handwritten digits (shipped with scikit-learn, no download),
  1 x 8 x 8, 1437 train / 360 test in a fixed stratified split. The default.
- ``fashion-mnist`` / ``mnist``: 1 x 28 x 28, 60,000 train / 10,000 test, from the four standard
  IDX files (gzipped or not) in ``root=``, ``$FASTMASK_DATA`` or, for Fashion-MNIST, the folder
  Debian's package ``dataset-fashion-mnist`` installs (``/usr/share/datasets/fashion-mnist``).
  Magic numbers, dimensions and counts are checked (``read_idx``).
- ``cifar10`` / ``cifar100``: the standard python-format batch files (``cifar-10-batches-py`` /
  ``cifar-100-python``). The files are pickles; they are read with a restricted unpickler that
  builds only dicts, lists, bytes, ints and numpy arrays, so a crafted file cannot run code
  (``read_cifar_pickle``).
- ``imagefolder``: ``root/train/<class>/*`` and ``root/val/<class>/*`` (or ``test/``) through
  torchvision (optional), resized and centre-cropped to ``size`` (ImageNet-10 style subsets).
- ``synthetic``: uniform random images of any shape and class count, for benchmarks and tests.

Example::

    from fastmask import sources

    raw = sources.SOURCES["fashion-mnist"][0](root=None)     # from /usr/share/datasets/fashion-mnist
    labels = sources.read_idx("t10k-labels-idx1-ubyte.gz")   # uint8 [10000]
"""
from __future__ import annotations

import dataclasses
import gzip
import math
import os
import pickle
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

DATA_ROOT_ENV = "FASTMASK_DATA"


@dataclasses.dataclass
class Raw:
    """A dataset as its source gives it: images float32 ``[N, C, H, W]`` in [0, 1], labels int64 ``[N]``."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    classes: tuple[str, ...] | None = None


DIGITS_TEST_SIZE = 360


def _digits() -> Raw:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    # Fixed, independent of the run's seed, so every run is scored on the same 360 test images.
    train_index, test_index = train_test_split(
        np.arange(len(labels)), test_size=DIGITS_TEST_SIZE, stratify=digits.target, random_state=0
    )
    train_index, test_index = torch.from_numpy(np.sort(train_index)), torch.from_numpy(np.sort(test_index))
    return Raw(
        images[train_index], labels[train_index], images[test_index], labels[test_index], 10,
        tuple(str(name) for name in digits.target_names),
    )


def _synthetic(shape=(3, 32, 32), num_classes=10, train_size=1024, test_size=256, seed=0) -> Raw:
    shape = tuple(shape)
    if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"shape must be (C, H, W) of positive ints, got {shape}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    for what, size in (("train_size", train_size), ("test_size", test_size)):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"{what} must be a positive int, got {size!r}")
    generator = torch.Generator().manual_seed(seed)

    def draw(n):
        images = torch.rand((n, *shape), generator=generator)
        # Balanced classes (every class present once n >= num_classes), in random order.
        labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=generator)]
        return images, labels

    train_images, train_labels = draw(train_size)
    test_images, test_labels = draw(test_size)
    return Raw(train_images, train_labels, test_images, test_labels, num_classes)


_CIFAR = {
    "cifar10": dict(
        folder="cifar-10-batches-py",
        train=[f"data_batch_{i}" for i in range(1, 6)],
        test=["test_batch"],
        meta="batches.meta",
        label_key="labels",
        names_key="label_names",
        num_classes=10,
        archive="cifar-10-python.tar.gz",
    ),
    "cifar100": dict(
        folder="cifar-100-python",
        train=["train"],
        test=["test"],
        meta="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
        num_classes=100,
        archive="cifar-100-python.tar.gz",
    ),
}
CIFAR_PIXELS = 3 * 32 * 32


def _cifar(name: str, root=None) -> Raw:
    spec = _CIFAR[name]
    files = spec["train"] + spec["test"]
    how = f"extract {spec['archive']} from https://www.cs.toronto.edu/~kriz/cifar.html"
    found = _find_files([_data_root(root, name)], (spec["folder"],), files, name, "the python-format batch files", how)
    folder = found[files[0]].parent

    def read(file_names):
        images, labels = [], []
        for file_name in file_names:
            x, y = _cifar_batch(folder / file_name, spec["label_key"], spec["num_classes"])
            images.append(x)
            labels.append(y)
        images = torch.from_numpy(np.concatenate(images)).reshape(-1, 3, 32, 32)
        return images.float().div_(255.0), torch.from_numpy(np.concatenate(labels))

    train_images, train_labels = read(spec["train"])
    test_images, test_labels = read(spec["test"])
    classes = None
    if (folder / spec["meta"]).is_file():
        classes = _cifar_names(folder / spec["meta"], spec["names_key"], spec["num_classes"])
    return Raw(train_images, train_labels, test_images, test_labels, spec["num_classes"], classes)


def _imagefolder(root=None, size=32) -> Raw:
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    from torch.utils.data import DataLoader

    try:
        from torchvision import datasets, transforms
    except ImportError as exc:
        raise ImportError(
            "the imagefolder dataset reads images through torchvision: pip install 'fastmask[vision]'"
        ) from exc
    base = _data_root(root, "imagefolder")
    train_dir = base / "train"
    test_dir = next((base / sub for sub in ("val", "test") if (base / sub).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise FileNotFoundError(
            f"imagefolder: expected {base}/train/<class>/<images> and {base}/val/<class>/<images> "
            f"(or test/ instead of val/); found {'no ' if not train_dir.is_dir() else ''}train/ and "
            f"{'no val/ or test/' if test_dir is None else test_dir.name + '/'}"
        )
    transform = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor()])
    train = datasets.ImageFolder(str(train_dir), transform=transform)
    test = datasets.ImageFolder(str(test_dir), transform=transform)
    if train.class_to_idx != test.class_to_idx:
        raise ValueError(f"imagefolder: {train_dir} and {test_dir} hold different class folders")

    def stack(folder):
        # Decoding and resizing full-size images is the slow part: worker processes share it.
        batches = DataLoader(folder, batch_size=256, num_workers=min(8, os.cpu_count() or 1))
        images, labels = zip(*batches)
        return torch.cat(images), torch.cat(labels).long()

    train_images, train_labels = stack(train)
    test_images, test_labels = stack(test)
    return Raw(train_images, train_labels, test_images, test_labels, len(train.classes), tuple(train.classes))


IDX_FILES = {  # split: (images, labels), each file named so or with .gz
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_COUNTS = {"train": 60000, "test": 10000}  # the same for MNIST and Fashion-MNIST
IDX_SIDE = 28
FASHION_MNIST_SYSTEM_FOLDER = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
_IDX = {
    "mnist": dict(
        folders=("mnist", "MNIST/raw"),  # root/mnist, or torchvision's download folder
        classes=tuple(str(digit) for digit in range(10)),
        system_folder=None,
        how="the four files of http://yann.lecun.com/exdb/mnist/",
    ),
    "fashion-mnist": dict(
        folders=("fashion-mnist", "FashionMNIST/raw"),
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"),
        system_folder=FASHION_MNIST_SYSTEM_FOLDER,
        how=f"apt-get install dataset-fashion-mnist puts them in {FASHION_MNIST_SYSTEM_FOLDER}; or pass root= "
        "(or set $FASTMASK_DATA) to a folder holding those of https://github.com/zalandoresearch/fashion-mnist",
    ),
}


def _idx_dataset(name: str, root=None) -> Raw:
    spec = _IDX[name]
    system_folder = spec["system_folder"]
    roots = []
    if root is not None or os.environ.get(DATA_ROOT_ENV) or system_folder is None:
        roots.append(_data_root(root, name))  # raises when there is no folder to look in
    if root is None and system_folder is not None:  # a folder named by the caller is the only place looked in
        roots.append(system_folder)
    files = [file for pair in IDX_FILES.values() for file in pair]
    found = _find_files(roots, spec["folders"], files, name, "the IDX files", spec["how"], suffixes=("", ".gz"))

    def read(split):
        images_file, labels_file = (found[f] for f in IDX_FILES[split])
        count, side = IDX_COUNTS[split], IDX_SIDE
        images, labels = read_idx(images_file), read_idx(labels_file)
        if images.shape != (count, side, side):
            raise ValueError(f"{images_file}: expected {count} images of {side} x {side} ({split} split of {name}), "
                             f"got dimensions {' x '.join(map(str, images.shape))}")
        if labels.shape != (count,):
            raise ValueError(f"{labels_file}: expected {count} labels ({split} split of {name}), got dimensions "
                             f"{' x '.join(map(str, labels.shape))}")
        if labels.max() >= len(spec["classes"]):
            raise ValueError(f"{labels_file}: labels must lie in [0, {len(spec['classes'])}), got up to {labels.max()}")
        # One conversion of the whole array (a copy: the file's bytes are read-only), no loop over images.
        pixels = torch.from_numpy(images.reshape(count, 1, side, side).astype(np.float32)).div_(255.0)
        return pixels, torch.from_numpy(labels.astype(np.int64))

    train_images, train_labels = read("train")
    test_images, test_labels = read("test")
    return Raw(train_images, train_labels, test_images, test_labels, len(spec["classes"]), spec["classes"])


SOURCES = {  # name: (reader, the options of load(name, **options) it takes)
    "digits": (_digits, ()),
    "fashion-mnist": (lambda root: _idx_dataset("fashion-mnist", root), ()),
    "mnist": (lambda root: _idx_dataset("mnist", root), ()),
    "cifar10": (lambda root: _cifar("cifar10", root), ()),
    "cifar100": (lambda root: _cifar("cifar100", root), ()),
    "imagefolder": (_imagefolder, ("size",)),
    "synthetic": (_synthetic, ("shape", "num_classes", "train_size", "test_size")),
}
DATASETS = tuple(SOURCES)


def _data_root(root, name: str) -> Path:
    if root is None:
        root = os.environ.get(DATA_ROOT_ENV) or None
    if root is None:
        raise FileNotFoundError(f"{name} is read from a local folder: pass root=... or set ${DATA_ROOT_ENV}")
    return Path(root).expanduser()


def _find_files(roots: list[Path], subfolders: Sequence[str], files: list[str], name: str, what: str, how: str,
                suffixes: Sequence[str] = ("",)) -> dict[str, Path]:
    """The path of each of ``files`` (named so, or with one of ``suffixes``) in the first folder that
    holds them all, trying each root itself, then its ``subfolders``; else a FileNotFoundError that
    says, for each root, what is missing where."""

    def locate(folder: Path, file: str) -> Path | None:
        return next((folder / (file + s) for s in suffixes if (folder / (file + s)).is_file()), None)

    for root in roots:
        for folder in (root, *(root / sub for sub in subfolders)):
            paths = {file: locate(folder, file) for file in files}
            if all(paths.values()):
                return paths
    places, reasons = [], []
    for root in roots:
        places.append(" or in ".join(str(folder) for folder in (root, *(root / sub for sub in subfolders))))
        if not root.is_dir():
            reasons.append(f"{root} does not exist or is not a folder")
            continue
        where = next((root / sub for sub in subfolders if (root / sub).is_dir()), root)
        missing = [file for file in files if locate(where, file) is None]
        reasons.append(f"{where} lacks {', '.join(missing)}")
    spelled = ", ".join(file + ("[.gz]" if ".gz" in suffixes else "") for file in files)
    raise FileNotFoundError(
        f"{name}: expected {what} {spelled} in {', or '.join(places)} ({how}); {'; '.join(reasons)}"
    )


# ----------------------------------------------------------------------------------------------
# The IDX reader (MNIST, Fashion-MNIST)
# ----------------------------------------------------------------------------------------------

IDX_UNSIGNED_BYTE = 0x08  # the element type code of the MNIST-style files, the only one read


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file of unsigned bytes (gunzipped first when its name ends in ``.gz``).

    The format: a big-endian magic number ``0x000008NN`` (type code 0x08: unsigned bytes; NN the
    number of dimensions), NN big-endian uint32 sizes, then the bytes in row-major order. Returns a
    read-only uint8 array of those sizes (a view of the file's bytes, no copy). Raises
    ``ValueError`` naming the file when it is not such a file: a wrong magic number, a header
    or data shorter than it says (truncated), or bytes after the data.

    Example::

        images = read_idx("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")  # (10000, 28, 28)
    """
    path = Path(path)
    if path.name.endswith(".gz"):
        try:
            payload = gzip.decompress(path.read_bytes())
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:  # EOFError: a truncated archive
            raise ValueError(f"{path}: not a readable gzip file ({type(exc).__name__}: {exc})") from exc
    else:
        payload = path.read_bytes()
    if len(payload) < 4:
        raise ValueError(f"{path}: truncated: {len(payload)} bytes, shorter than an IDX magic number")
    magic = int.from_bytes(payload[:4], "big")
    dims = payload[3]
    if payload[:2] != b"\0\0" or payload[2] != IDX_UNSIGNED_BYTE or dims == 0:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes: magic number 0x{magic:08X}, expected "
                         f"0x0000{IDX_UNSIGNED_BYTE:02X}NN, NN the number of dimensions (0x00000803 for images, "
                         "0x00000801 for labels)")
    header = 4 + 4 * dims
    if len(payload) < header:
        raise ValueError(f"{path}: truncated: the header of {dims} dimensions needs {header} bytes, the file has "
                         f"{len(payload)}")
    shape = tuple(int.from_bytes(payload[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    size = math.prod(shape)
    stored = len(payload) - header
    if stored != size:
        state = "truncated" if stored < size else "malformed"
        raise ValueError(f"{path}: {state}: dimensions {' x '.join(map(str, shape))} need {size} bytes of data, "
                         f"the file holds {stored}")
    return np.frombuffer(payload, np.uint8, count=size, offset=header).reshape(shape)


# ----------------------------------------------------------------------------------------------
# The restricted CIFAR reader
# ----------------------------------------------------------------------------------------------


class _RefusedGlobal(pickle.UnpicklingError):
    pass


def _latin1_encode(text, encoding):
    """``_codecs.encode`` as protocol-2 pickles from Python 3 use it for bytes; latin-1 text only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _RefusedGlobal(
            f"_codecs.encode is only accepted on str with 'latin1', got {type(text).__name__}, {encoding!r}"
        )
    return text.encode("latin1")


def _numpy_globals() -> dict:
    """The callables a pickled uint8 numpy array needs, under every module path numpy has used."""
    probe = np.zeros(1, dtype=np.uint8)
    reconstruct = probe.__reduce__()[0]  # protocols 0-4
    frombuffer = probe.__reduce_ex__(5)[0]  # protocol 5
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1_encode}
    for package in ("numpy.core", "numpy._core"):  # numpy 1.x (the CIFAR files) and numpy 2.x
        allowed[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{package}.numeric", "_frombuffer")] = frombuffer
    return allowed


_ALLOWED_GLOBALS = _numpy_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, tuples, bytes, str, numbers and numpy arrays; refuses every other global.

    Code runs from a pickle only through the globals it names (REDUCE, BUILD, INST, OBJ, NEWOBJ
    all start from one), so answering ``find_class`` from a closed table of numpy's array
    constructors stops a crafted file from calling anything else.
    """

    def __init__(self, file, path):
        # encoding="bytes": the CIFAR files are Python 2 pickles whose str values are raw bytes.
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(
                f"{self._path}: refused to load the global {module}.{name}: a CIFAR batch file holds only "
                f"dicts, lists, bytes and numpy arrays (a crafted pickle calls functions this way)"
            ) from None

    def persistent_load(self, pid):
        raise _RefusedGlobal(f"{self._path}: refused a persistent id: CIFAR batch files have none")


def read_cifar_pickle(path: str | os.PathLike) -> dict:
    """Read one python-format CIFAR file (a batch or the meta file) with the restricted unpickler.

    Returns its dict with str keys. Raises ``pickle.UnpicklingError`` naming the file and the
    global when the file asks for anything but numpy arrays, and ``ValueError`` when it is not a
    readable pickle of a dict.
    """
    path = Path(path)
    try:
        with open(path, "rb") as file:
            payload = _RestrictedUnpickler(file, path).load()
    except _RefusedGlobal:
        raise
    except Exception as exc:  # a truncated or corrupt file fails in many ways; all mean "malformed"
        raise ValueError(f"{path}: not a readable python-format CIFAR file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(payload).__name__}")
    try:
        return {key.decode("ascii") if isinstance(key, bytes) else key: value for key, value in payload.items()}
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: a key is not ASCII ({exc})") from exc


def _cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    payload = read_cifar_pickle(path)
    for key in ("data", label_key):
        if key not in payload:
            raise ValueError(f"{path}: no {key!r} entry (found {sorted(map(str, payload))})")
    data = payload["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR_PIXELS:
        raise ValueError(f"{path}: 'data' must be a uint8 array [N, {CIFAR_PIXELS}], got {describe(data)}")
    labels = payload[label_key]
    if isinstance(labels, np.ndarray):
        integral = labels.ndim == 1 and labels.dtype.kind in "iu"
    else:
        integral = isinstance(labels, list) and all(type(label) is int for label in labels)
    if not integral:
        raise ValueError(f"{path}: {label_key!r} must be a list of ints, got {describe(labels)}")
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(data):
        raise ValueError(f"{path}: {len(labels)} labels for {len(data)} images")
    if len(labels) and not (labels.min() >= 0 and labels.max() < num_classes):
        raise ValueError(f"{path}: labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    return data, labels


def _cifar_names(path: Path, key: str, num_classes: int) -> tuple[str, ...]:
    names = read_cifar_pickle(path).get(key)
    if not isinstance(names, list) or len(names) != num_classes or not all(isinstance(n, (bytes, str)) for n in names):
        raise ValueError(f"{path}: {key!r} must be a list of {num_classes} names")
    return tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names)


def describe(x) -> str:
    """A value's type, with dtype and shape for arrays and tensors (for error messages)."""
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return f"{type(x).__name__} of dtype {x.dtype} and shape {tuple(x.shape)}"
    return type(x).__name__
