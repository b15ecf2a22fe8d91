"""fastmask.data and fastmask.sources: the datasets, the IDX and restricted CIFAR readers, ZCA, device-side
augmentation, K-model batches."""
import gzip
import os
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastmask import data, sources

# ----------------------------------------------------------------------------------------------
# A fake CIFAR folder written in the real format
# ----------------------------------------------------------------------------------------------


class Py2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for the CIFAR files (protocol 2).

    Python 2 str (keys, file names, an array's raw bytes and its dtype strings) becomes
    SHORT_BINSTRING / BINSTRING, which Python 3 reads back as bytes with encoding="bytes";
    numpy globals are named under numpy.core, numpy 1.x's module path.
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        raw = obj if isinstance(obj, bytes) else obj.encode("latin1")
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)

    dispatch[type] = save_global


def write_pickle(path, payload, protocol):
    """``protocol`` "py2" writes the Python 2 format of the published files; an int, pickle.dump's."""
    with open(path, "wb") as file:
        if protocol == "py2":
            Py2Pickler(file, protocol=2).dump(payload)
        else:
            pickle.dump(payload, file, protocol=protocol)


CIFAR10_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


def write_fake_cifar(parent, name="cifar10", per_batch=3, protocol="py2", seed=0):
    """A tiny cifar-10-batches-py / cifar-100-python folder; returns (folder, train, test) raw arrays."""
    rng = np.random.default_rng(seed)
    if name == "cifar10":
        folder, test_files = parent / "cifar-10-batches-py", ["test_batch"]
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        label_key, num_classes = b"labels", 10
    else:
        folder, train_files, test_files = parent / "cifar-100-python", ["train"], ["test"]
        label_key, num_classes = b"fine_labels", 100
    folder.mkdir(parents=True)
    arrays = {}
    for file_name in train_files + test_files:
        images = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, num_classes, size=per_batch)]
        payload = {b"batch_label": file_name.encode(), label_key: labels, b"data": images,
                   b"filenames": [f"img_{i}.png".encode() for i in range(per_batch)]}
        if name == "cifar100":
            payload[b"coarse_labels"] = [v // 5 for v in labels]
        write_pickle(folder / file_name, payload, protocol)
        arrays[file_name] = (images, labels)
    if name == "cifar10":
        write_pickle(folder / "batches.meta", {b"label_names": CIFAR10_NAMES, b"num_vis": 3072}, protocol)
    else:
        names = [f"class_{i}".encode() for i in range(100)]
        write_pickle(folder / "meta", {b"fine_label_names": names, b"coarse_label_names": names[:20]}, protocol)

    def join(files):
        images = np.concatenate([arrays[f][0] for f in files]).reshape(-1, 3, 32, 32)
        labels = np.concatenate([arrays[f][1] for f in files])
        return torch.from_numpy(images).float() / 255, torch.from_numpy(labels)

    return folder, join(train_files), join(test_files)


@pytest.mark.parametrize("protocol", ["py2", 2, 4, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_reads_real_format(tmp_path, name, protocol):
    folder, (train_x, train_y), (test_x, test_y) = write_fake_cifar(tmp_path, name, protocol=protocol)
    splits = data.load(name, root=tmp_path)  # the parent of the batch folder
    assert splits.train.images.shape == (len(train_y), 3, 32, 32) and splits.train.images.dtype == torch.float32
    assert splits.train.num_classes == (10 if name == "cifar10" else 100)
    torch.testing.assert_close(splits.train.denormalize(splits.train.images), train_x, rtol=0, atol=1e-5)
    torch.testing.assert_close(splits.test.denormalize(splits.test.images), test_x, rtol=0, atol=1e-5)
    assert torch.equal(splits.train.labels, train_y) and torch.equal(splits.test.labels, test_y)
    expected_names = [n.decode() for n in CIFAR10_NAMES] if name == "cifar10" else [f"class_{i}" for i in range(100)]
    assert list(splits.train.classes) == expected_names
    # root may also be the batch folder itself.
    again = data.load(name, root=folder)
    assert torch.equal(again.train.images, splits.train.images)


def test_cifar_pixel_layout(tmp_path):
    """A row is 1024 red, 1024 green, 1024 blue values, each a 32 x 32 image in row-major order."""
    folder, _, _ = write_fake_cifar(tmp_path)
    images, labels = sources._cifar_batch(folder / "data_batch_1", "labels", 10)
    row = images[0]
    splits = data.load("cifar10", root=folder)
    raw = splits.train.denormalize(splits.train.images[:1])[0] * 255
    assert round(raw[1, 3, 5].item()) == row[1024 + 3 * 32 + 5]
    assert round(raw[2, 31, 0].item()) == row[2048 + 31 * 32]


def test_cifar_root_from_environment(tmp_path, monkeypatch):
    write_fake_cifar(tmp_path)
    monkeypatch.setenv("FASTMASK_DATA", str(tmp_path))
    assert len(data.load("cifar10").train) == 15


class CallsSystem:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class CallsExec:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("attack", [CallsSystem, CallsExec])
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_reader_refuses_code(tmp_path, attack, protocol):
    folder, _, _ = write_fake_cifar(tmp_path)
    marker = tmp_path / "hacked"
    # Control: the plain unpickler does run it, so the refusal below is what protects.
    assert not marker.exists()
    pickle.loads(pickle.dumps(attack(marker), protocol=protocol))
    assert marker.exists()
    marker.unlink()

    payload = {b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1, 2], b"batch_label": attack(marker)}
    write_pickle(folder / "data_batch_3", payload, protocol)
    with pytest.raises(pickle.UnpicklingError) as info:
        data.load("cifar10", root=tmp_path)
    message = str(info.value)
    assert "data_batch_3" in message and ("system" in message or "exec" in message)
    assert not marker.exists()


def test_cifar_reader_refuses_other_numpy_globals(tmp_path):
    # A hand-written protocol-2 pickle calling numpy.load(path): allowed module, refused global.
    path = tmp_path / "crafted"
    path.write_bytes(b"\x80\x02cnumpy\nload\nq\x00U\x04/etcq\x01\x85q\x02Rq\x03.")
    with pytest.raises(pickle.UnpicklingError, match="numpy.load"):
        sources.read_cifar_pickle(path)
    # _codecs.encode is accepted for latin-1 only (protocol-2 bytes), nothing else.
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x04\x00\x00\x00zlib\x86R.")
    with pytest.raises(pickle.UnpicklingError, match="latin1"):
        sources.read_cifar_pickle(path)


def test_cifar_malformed_files(tmp_path):
    folder, _, _ = write_fake_cifar(tmp_path)
    good = (folder / "data_batch_2").read_bytes()
    (folder / "data_batch_2").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="data_batch_2.*not a readable"):
        data.load("cifar10", root=tmp_path)
    write_pickle(folder / "data_batch_2", {b"data": np.zeros((3, 3072), np.float32), b"labels": [0, 1, 2]}, 2)
    with pytest.raises(ValueError, match="data_batch_2.*uint8"):
        data.load("cifar10", root=tmp_path)
    write_pickle(folder / "data_batch_2", {b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1]}, 2)
    with pytest.raises(ValueError, match="2 labels for 3 images"):
        data.load("cifar10", root=tmp_path)
    write_pickle(folder / "data_batch_2", {b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1, 10]}, 2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        data.load("cifar10", root=tmp_path)
    write_pickle(folder / "data_batch_2", [1, 2, 3], 2)
    with pytest.raises(ValueError, match="expected a pickled dict"):
        data.load("cifar10", root=tmp_path)


def test_cifar_missing_folder(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        data.load("cifar10", root=tmp_path / "nowhere")
    assert "data_batch_1" in str(info.value) and "test_batch" in str(info.value) and "nowhere" in str(info.value)
    folder, _, _ = write_fake_cifar(tmp_path)
    (folder / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py lacks data_batch_4"):
        data.load("cifar10", root=tmp_path)
    monkeypatch.delenv("FASTMASK_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="FASTMASK_DATA"):
        data.load("cifar100")


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST and MNIST: IDX files written in the real format
# ----------------------------------------------------------------------------------------------

IDX_NAMES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
SMALL_COUNTS = {"train": 12, "test": 5}


def idx_bytes(array, type_code=0x08):
    """The IDX encoding of a uint8 array, written from the format's description (big-endian header)."""
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(path, array, gz, type_code=0x08):
    payload = idx_bytes(array, type_code)
    path = path.with_name(path.name + ".gz") if gz else path
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def write_fake_idx(folder, gz=True, counts=SMALL_COUNTS, seed=0):
    """The four files of a tiny MNIST-style dataset; returns {split: (images [N, 28, 28] uint8, labels [N])}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, (images_name, labels_name) in IDX_NAMES.items():
        images = rng.integers(0, 256, size=(counts[split], 28, 28), dtype=np.uint8)
        labels = (np.arange(counts[split]) % 10).astype(np.uint8)
        rng.shuffle(labels)
        write_idx(folder / images_name, images, gz)
        write_idx(folder / labels_name, labels, gz)
        arrays[split] = (images, labels)
    return arrays


@pytest.fixture
def small_idx(monkeypatch):
    """Tiny IDX datasets pass the count check; nothing is found outside the test's folders."""
    for split, count in SMALL_COUNTS.items():
        monkeypatch.setitem(sources.IDX_COUNTS, split, count)
    monkeypatch.delenv("FASTMASK_DATA", raising=False)
    monkeypatch.setitem(sources._IDX["fashion-mnist"], "system_folder", Path("/nonexistent/fashion-mnist"))


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("name", ["fashion-mnist", "mnist"])
def test_idx_reads_real_format(tmp_path, small_idx, name, gz):
    arrays = write_fake_idx(tmp_path, gz=gz)
    splits = data.load(name, root=tmp_path)
    for split, dataset in (("train", splits.train), ("test", splits.test)):
        images, labels = arrays[split]
        assert dataset.images.shape == (len(images), 1, 28, 28) and dataset.images.dtype == torch.float32
        expected = torch.from_numpy(images.astype(np.float64) / 255).reshape(-1, 1, 28, 28)
        torch.testing.assert_close(dataset.denormalize(dataset.images).double(), expected, rtol=0, atol=1e-5)
        assert torch.equal(dataset.labels, torch.from_numpy(labels.astype(np.int64)))
    assert splits.train.num_classes == 10
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert list(splits.train.classes) == (names if name == "fashion-mnist" else [str(d) for d in range(10)])


def test_idx_pixel_layout(tmp_path, small_idx):
    """Byte 16 + 784 i + 28 r + c of the images file is pixel (r, c) of image i."""
    write_fake_idx(tmp_path, gz=False)
    raw = (tmp_path / "train-images-idx3-ubyte").read_bytes()
    splits = data.load("mnist", root=tmp_path)
    pixels = splits.train.denormalize(splits.train.images) * 255
    for i, r, c in ((0, 0, 0), (3, 5, 27), (11, 27, 1)):
        assert round(pixels[i, 0, r, c].item()) == raw[16 + 784 * i + 28 * r + c]


def test_idx_folders(tmp_path, small_idx, monkeypatch):
    # Mixed: some files gzipped, some not; in root/fashion-mnist.
    arrays = write_fake_idx(tmp_path / "fashion-mnist", gz=True)
    for name in IDX_NAMES["test"]:
        path = tmp_path / "fashion-mnist" / (name + ".gz")
        (tmp_path / "fashion-mnist" / name).write_bytes(gzip.decompress(path.read_bytes()))
        path.unlink()
    splits = data.load("fashion-mnist", root=tmp_path)
    assert torch.equal(splits.test.labels, torch.from_numpy(arrays["test"][1].astype(np.int64)))
    # torchvision's download folder; $FASTMASK_DATA.
    write_fake_idx(tmp_path / "tv" / "MNIST" / "raw", gz=False, seed=1)
    monkeypatch.setenv("FASTMASK_DATA", str(tmp_path / "tv"))
    assert len(data.load("mnist").train) == SMALL_COUNTS["train"]
    # Fashion-MNIST's Debian folder when neither root nor $FASTMASK_DATA holds it, never when root is given.
    debian = tmp_path / "usr-share-datasets-fashion-mnist"
    arrays = write_fake_idx(debian, seed=2)
    monkeypatch.setitem(sources._IDX["fashion-mnist"], "system_folder", debian)
    splits = data.load("fashion-mnist")  # $FASTMASK_DATA (tmp_path/tv) has no Fashion-MNIST
    assert torch.equal(splits.train.labels, torch.from_numpy(arrays["train"][1].astype(np.int64)))
    monkeypatch.delenv("FASTMASK_DATA")
    assert len(data.load("fashion-mnist").test) == SMALL_COUNTS["test"]
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.load("fashion-mnist", root=tmp_path / "tv")
    with pytest.raises(FileNotFoundError, match="FASTMASK_DATA"):
        data.load("mnist")  # MNIST has no system folder


def test_idx_missing_files(tmp_path, small_idx):
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        data.load("mnist", root=tmp_path / "nowhere")
    message = str(info.value)
    assert all(f"{name}[.gz]" in message for pair in IDX_NAMES.values() for name in pair)
    write_fake_idx(tmp_path / "mnist")
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"mnist lacks t10k-labels-idx1-ubyte$"):
        data.load("mnist", root=tmp_path)


def test_read_idx_checks_the_format(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for gz in (True, False):
        path = write_idx(tmp_path / f"ok{gz}", images, gz)
        read = sources.read_idx(path)
        assert read.shape == (2, 3, 4) and read.dtype == np.uint8 and np.array_equal(read, images)
    good = idx_bytes(images)
    cases = {
        "int32 type code": idx_bytes(images, type_code=0x0C),
        "little-endian magic": bytes([3, 8, 0, 0]) + good[4:],
        "zero dimensions": bytes([0, 0, 8, 0]),
        "short magic": good[:3],
        "short header": good[:10],
        "truncated data": good[:-1],
        "bytes after the data": good + b"\x00",
    }
    messages = {"int32 type code": "magic number 0x00000C03", "little-endian magic": "magic number 0x03080000",
                "zero dimensions": "magic number 0x00000800", "short magic": "truncated: 3 bytes",
                "short header": "truncated: the header of 3 dimensions needs 16 bytes",
                "truncated data": "truncated: dimensions 2 x 3 x 4 need 24 bytes of data, the file holds 23",
                "bytes after the data": "malformed: dimensions 2 x 3 x 4 need 24 bytes of data, the file holds 25"}
    for case, payload in cases.items():
        for gz in (True, False):
            path = tmp_path / ("bad.gz" if gz else "bad")
            path.write_bytes(gzip.compress(payload) if gz else payload)
            with pytest.raises(ValueError, match=re.escape(messages[case])) as info:
                sources.read_idx(path)
            assert str(path) in str(info.value), case
    # A gzip stream cut short, and a file that is not gzip at all.
    cut = tmp_path / "cut.gz"
    cut.write_bytes(gzip.compress(good)[:-12])
    with pytest.raises(ValueError, match="cut.gz: not a readable gzip file"):
        sources.read_idx(cut)
    plain = tmp_path / "plain.gz"
    plain.write_bytes(good)
    with pytest.raises(ValueError, match="plain.gz: not a readable gzip file"):
        sources.read_idx(plain)


def test_idx_dataset_checks_dimensions_and_counts(tmp_path, small_idx, monkeypatch):
    folder = tmp_path / "data"

    def fails_with(message, file):
        with pytest.raises(ValueError, match=message) as info:
            data.load("fashion-mnist", root=folder)
        assert str(folder / file) in str(info.value)

    rng = np.random.default_rng(0)
    write_fake_idx(folder, gz=False)
    write_idx(folder / "train-images-idx3-ubyte", rng.integers(0, 256, (12, 27, 28), dtype=np.uint8), gz=False)
    fails_with("expected 12 images of 28 x 28 .*got dimensions 12 x 27 x 28", "train-images-idx3-ubyte")
    write_fake_idx(folder, gz=False)
    write_idx(folder / "t10k-images-idx3-ubyte", rng.integers(0, 256, (4, 28, 28), dtype=np.uint8), gz=False)
    fails_with("expected 5 images of 28 x 28 .*got dimensions 4 x 28 x 28", "t10k-images-idx3-ubyte")
    write_fake_idx(folder, gz=False)
    write_idx(folder / "train-labels-idx1-ubyte", np.zeros(11, np.uint8), gz=False)
    fails_with("expected 12 labels .*got dimensions 11", "train-labels-idx1-ubyte")
    write_fake_idx(folder, gz=False)
    write_idx(folder / "t10k-labels-idx1-ubyte", np.full(5, 10, np.uint8), gz=False)
    fails_with(r"labels must lie in \[0, 10\), got up to 10", "t10k-labels-idx1-ubyte")
    write_fake_idx(folder, gz=False)
    (folder / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(5, np.uint8))[:-2])
    fails_with("truncated", "t10k-labels-idx1-ubyte")
    # The real counts: a tiny file is refused once the counts are the published ones.
    monkeypatch.setitem(sources.IDX_COUNTS, "train", 60000)
    write_fake_idx(folder, gz=False)
    fails_with("expected 60000 images of 28 x 28", "train-images-idx3-ubyte")


FASHION_FILES = [sources.FASHION_MNIST_SYSTEM_FOLDER / f"{name}.gz" for pair in IDX_NAMES.values() for name in pair]


@pytest.mark.skipif(not all(path.is_file() for path in FASHION_FILES),
                    reason=f"Fashion-MNIST is not installed in {sources.FASHION_MNIST_SYSTEM_FOLDER} "
                           "(apt-get install dataset-fashion-mnist; .ci/run does so where apt-get is there)")
def test_fashion_mnist_from_the_debian_package(monkeypatch):
    monkeypatch.delenv("FASTMASK_DATA", raising=False)
    splits = data.load("fashion-mnist")
    assert splits.train.images.shape == (60000, 1, 28, 28) and splits.test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(splits.train.labels).tolist() == [6000] * 10
    assert torch.bincount(splits.test.labels).tolist() == [1000] * 10
    assert splits.train.classes[0] == "T-shirt/top" and splits.train.classes[9] == "Ankle boot"
    # The published pixel statistics of the training set (in [0, 1]): mean 0.2860, std 0.3530.
    assert abs(splits.train.mean.item() - 0.2860) < 1e-4 and abs(splits.train.std.item() - 0.3530) < 1e-4
    raw = splits.test.denormalize(splits.test.images[:100])
    assert raw.min() > -1e-5 and raw.max() < 1 + 1e-5


# ----------------------------------------------------------------------------------------------
# digits, synthetic, splits and normalisation
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


def sklearn_digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.from_numpy(d.data / 16.0), torch.from_numpy(d.target)


def sorted_rows(x):
    """Rows of a [N, D] tensor in a canonical order (by a random projection, then the row itself)."""
    x = x.double().reshape(len(x), -1)
    key = x @ torch.linspace(1, 2, x.shape[1], dtype=torch.float64).sin()
    return x[torch.argsort(key, stable=True)]


def test_digits_split(digits):
    assert digits.train.images.shape == (1437, 1, 8, 8) and digits.test.images.shape == (360, 1, 8, 8)
    assert digits.train.images.dtype == torch.float32 and digits.train.labels.dtype == torch.int64
    assert digits.train.num_classes == 10 and digits.val is None
    # Stratified: every class's share of the test set matches its share of the data.
    _, target = sklearn_digits()
    expected = torch.bincount(target).double() * 360 / len(target)
    assert (torch.bincount(digits.test.labels, minlength=10).double() - expected).abs().max() <= 1
    # Fixed: the same split for another run and another seed.
    other = data.load("digits", seed=5)
    assert torch.equal(other.test.images, digits.test.images) and torch.equal(other.train.labels, digits.train.labels)
    # Train and test partition sklearn's images.
    x, _ = sklearn_digits()
    ours = torch.cat([digits.train.denormalize(digits.train.images), digits.test.denormalize(digits.test.images)])
    torch.testing.assert_close(sorted_rows(ours), sorted_rows(x), rtol=0, atol=1e-5)


def test_normalisation_uses_train_statistics(digits):
    x, _ = sklearn_digits()
    raw_train = digits.train.denormalize(digits.train.images).double()
    torch.testing.assert_close(digits.train.mean.double(), raw_train.mean(dim=(0, 2, 3)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(digits.train.std.double(), raw_train.std(dim=(0, 2, 3), unbiased=False), rtol=1e-5, atol=0)
    assert abs(digits.train.images.double().mean().item()) < 1e-5
    assert abs(digits.train.images.double().std(unbiased=False).item() - 1) < 1e-5
    # The test set uses the train statistics, not its own.
    assert torch.equal(digits.test.mean, digits.train.mean)
    raw_test = digits.test.denormalize(digits.test.images)
    torch.testing.assert_close(digits.test.normalize(raw_test), digits.test.images, rtol=0, atol=1e-5)


def test_validation_split(digits):
    splits = data.load("digits", val_fraction=0.2, seed=3)
    counts = torch.bincount(digits.train.labels, minlength=10)
    expected_val = torch.floor(counts.double() * 0.2 + 0.5).long()
    assert torch.equal(torch.bincount(splits.val.labels, minlength=10), expected_val)
    assert len(splits.train) + len(splits.val) == 1437
    assert torch.equal(splits.test.labels, digits.test.labels)
    # val and train partition the full training set.
    full = digits.train.denormalize(digits.train.images)
    parts = torch.cat([splits.train.denormalize(splits.train.images), splits.val.denormalize(splits.val.images)])
    torch.testing.assert_close(sorted_rows(parts), sorted_rows(full), rtol=0, atol=1e-5)
    # Seeded: the same seed holds out the same examples, another seed others.
    same = data.load("digits", val_fraction=0.2, seed=3)
    other = data.load("digits", val_fraction=0.2, seed=4)
    assert torch.equal(same.val.images, splits.val.images)
    assert not torch.equal(other.val.labels, splits.val.labels) or not torch.equal(other.val.images, splits.val.images)


def test_train_size_keeps_a_stratified_seeded_subset(digits):
    counts = torch.bincount(digits.train.labels, minlength=10)
    for size in (10, 333, 1000, 1437):
        splits = data.load("digits", train_size=size, seed=3)
        kept = torch.bincount(splits.train.labels, minlength=10)
        assert kept.sum() == size
        # Each class keeps its share, rounded (down or up) so that the total is exact.
        share = counts.double() * size / counts.sum()
        assert ((kept >= share.floor()) & (kept <= share.ceil())).all(), (size, kept, share)
        # A subset of the training set; the test set untouched; the statistics those of the subset.
        raw = splits.train.denormalize(splits.train.images)
        full = digits.train.denormalize(digits.train.images)
        assert set(map(bytes, (raw * 16).round().byte().flatten(1).numpy())) <= set(
            map(bytes, (full * 16).round().byte().flatten(1).numpy()))
        torch.testing.assert_close(splits.train.mean.double(), raw.double().mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
        assert torch.equal(splits.test.denormalize(splits.test.images).mul(16).round(),
                           digits.test.denormalize(digits.test.images).mul(16).round())
    same = data.load("digits", train_size=333, seed=3)
    other = data.load("digits", train_size=333, seed=4)
    assert torch.equal(same.train.images, data.load("digits", train_size=333, seed=3).train.images)
    assert not torch.equal(other.train.images, same.train.images)
    # With a validation split: the validation set is the one without train_size, train_size counts what is left.
    with_val = data.load("digits", val_fraction=0.2, train_size=500, seed=3)
    without = data.load("digits", val_fraction=0.2, seed=3)
    assert len(with_val.train) == 500 and torch.equal(with_val.val.labels, without.val.labels)
    with pytest.raises(ValueError, match="train_size=1200 exceeds the 1150 training examples left after"):
        data.load("digits", val_fraction=0.2, train_size=1200)
    with pytest.raises(ValueError, match="train_size=1438 exceeds the 1437 training examples$"):
        data.load("digits", train_size=1438)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="train_size must be a positive int"):
            data.load("digits", train_size=bad)


def test_train_size_in_the_pipeline_config():
    from fastmask.config import load_config
    from fastmask.pipeline import load_data

    cfg = load_config(overrides=["data.train_size=200", "seed=2"])
    splits = load_data(cfg, torch.device("cpu"))
    assert len(splits.train) == 200 and torch.equal(splits.train.labels, data.load("digits", train_size=200,
                                                                                    seed=2).train.labels)
    assert load_config().data.train_size is None
    assert len(load_data(load_config(preset="synthetic-convnet3", overrides=["data.train_size=64"]),
                         torch.device("cpu")).train) == 64
    with pytest.raises(ValueError, match="train_size must be >= 1"):
        load_config(overrides=["data.train_size=0"])


def test_synthetic():
    splits = data.load("synthetic", shape=(2, 5, 7), num_classes=3, train_size=11, test_size=4, seed=1)
    assert splits.train.images.shape == (11, 2, 5, 7) and splits.test.images.shape == (4, 2, 5, 7)
    assert splits.train.num_classes == 3
    assert torch.bincount(splits.train.labels, minlength=3).tolist() == [4, 4, 3]
    again = data.load("synthetic", shape=(2, 5, 7), num_classes=3, train_size=11, test_size=4, seed=1)
    other = data.load("synthetic", shape=(2, 5, 7), num_classes=3, train_size=11, test_size=4, seed=2)
    assert torch.equal(again.train.images, splits.train.images)
    assert not torch.equal(other.train.images, splits.train.images)
    default = data.load("synthetic")
    assert default.train.images.shape == (1024, 3, 32, 32) and default.test.images.shape == (256, 3, 32, 32)


def test_load_rejects_bad_arguments():
    with pytest.raises(ValueError, match="'emnist'"):
        data.load("emnist")
    with pytest.raises(TypeError, match="colour"):
        data.load("synthetic", colour=True)
    with pytest.raises(ValueError, match="val_fraction"):
        data.load("digits", val_fraction=1.0)
    with pytest.raises(ValueError, match="shape"):
        data.load("synthetic", shape=(3, 32))


def test_nan_and_bad_labels_rejected():
    x = torch.rand(6, 1, 3, 3)
    y = torch.arange(6) % 2
    bad = x.clone()
    bad[2, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="train_images holds NaN or Inf"):
        data.from_tensors(bad, y, x, y)
    bad[2, 0, 1, 1] = float("inf")
    with pytest.raises(ValueError, match="test_images holds NaN or Inf"):
        data.from_tensors(x, y, bad, y)
    bad[2, 0, 1, 1] = float("-inf")
    bad[3, 0, 1, 1] = float("inf")  # the two infinities sum to NaN
    with pytest.raises(ValueError, match="train_images holds NaN or Inf"):
        data.from_tensors(bad, y, x, y)
    huge = torch.full((6, 1, 3, 3), 3e38)  # finite, but their sum overflows to Inf
    assert not torch.isfinite(huge.sum())
    data.from_tensors(huge, y, huge, y)
    splits = data.from_tensors(x, y, x, y)
    with pytest.raises(ValueError, match="images holds NaN"):
        data.Dataset(bad, y, 2, "t", splits.train.mean, splits.train.std)
    with pytest.raises(ValueError, match="labels must lie"):
        data.Dataset(x, y + 1, 2, "t", splits.train.mean, splits.train.std)
    with pytest.raises(TypeError, match="labels"):
        data.Dataset(x, y.float(), 2, "t", splits.train.mean, splits.train.std)


def test_dataset_helpers(digits, device):
    train = digits.train.to(device)
    assert train.device.type == device.type and train.mean.device.type == device.type
    indices = train.class_indices(3)
    assert (train.labels[indices] == 3).all() and len(indices) == int((train.labels == 3).sum())
    sub = train.subset(indices[:5])
    assert len(sub) == 5 and torch.equal(sub.images, train.images[indices[:5]])
    assert train.image_shape == (1, 8, 8)


# ----------------------------------------------------------------------------------------------
# ZCA
# ----------------------------------------------------------------------------------------------


def test_zca_matches_eigendecomposition(digits):
    x = digits.train.images
    eps = 0.1
    zca = data.ZCA.fit(x, eps=eps, chunk=500)  # several chunks
    flat = x.reshape(len(x), -1).double().numpy()
    centred = flat - flat.mean(0)
    cov = centred.T @ centred / (len(flat) - 1)
    eigvals, eigvecs = np.linalg.eigh(cov)
    eigvals = np.clip(eigvals, 0, None)
    # Whitened covariance = U diag(S / (S + eps)) U^T.
    white = zca(x).reshape(len(x), -1).double().numpy()
    white_cov = np.cov(white, rowvar=False)
    expected = (eigvecs * (eigvals / (eigvals + eps))) @ eigvecs.T
    np.testing.assert_allclose(white_cov, expected, atol=2e-5)
    np.testing.assert_allclose(white.mean(0), 0, atol=1e-5)
    torch.testing.assert_close(zca.inverse(zca(x)), x, rtol=0, atol=1e-4)


def test_zca_whitens_full_rank_data_to_identity():
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(12, 12, generator=generator)
    x = (torch.randn(4000, 12, generator=generator) @ mixing).reshape(4000, 3, 2, 2)
    zca = data.ZCA.fit(x, eps=1e-6)
    white = zca(x).reshape(4000, -1).double()
    cov = torch.cov(white.T)
    torch.testing.assert_close(cov, torch.eye(12, dtype=torch.float64), rtol=0, atol=1e-3)
    # ZCA is the symmetric whitening: the one closest to the identity map (no rotation).
    assert torch.allclose(zca.matrix, zca.matrix.T, atol=1e-5)


def test_load_with_zca(digits):
    splits = data.load("digits", zca=True, zca_eps=0.1)
    assert splits.train.zca is not None and splits.test.zca is splits.train.zca
    # The test set is whitened with the training fit; denormalize undoes both steps.
    torch.testing.assert_close(splits.test.images, splits.train.zca(digits.test.images), rtol=0, atol=1e-5)
    torch.testing.assert_close(
        splits.test.denormalize(splits.test.images), digits.test.denormalize(digits.test.images), rtol=0, atol=1e-4
    )


# ----------------------------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------------------------


def crop_flip_loop(images, dy, dx, flip, pad):
    """The obvious per-image reference."""
    flat = images.reshape(-1, *images.shape[-3:])
    h, w = flat.shape[-2:]
    out = []
    for img, y, x, f in zip(flat, dy.flatten().tolist(), dx.flatten().tolist(), flip.flatten().tolist()):
        crop = F.pad(img, (pad,) * 4)[:, y : y + h, x : x + w]
        out.append(crop.flip(-1) if f else crop)
    return torch.stack(out).reshape(images.shape)


def test_crop_flip_known_image():
    image = torch.arange(1.0, 1 + 2 * 5 * 7).reshape(1, 2, 5, 7)
    one = lambda v: torch.tensor([v])  # noqa: E731
    pad = 2
    assert torch.equal(data.crop_flip(image, one(pad), one(pad), one(False), pad), image)
    assert torch.equal(data.crop_flip(image, one(pad), one(pad), one(True), pad), image.flip(-1))
    shifted = data.crop_flip(image, one(0), one(0), one(False), pad)  # window at the top-left corner
    assert (shifted[..., :pad, :] == 0).all() and (shifted[..., :, :pad] == 0).all()
    assert torch.equal(shifted[..., pad:, pad:], image[..., : 5 - pad, : 7 - pad])
    right = data.crop_flip(image, one(pad), one(2 * pad), one(True), pad)  # shift left, then mirror
    assert torch.equal(right, torch.cat([image[..., pad:], torch.zeros(1, 2, 5, pad)], -1).flip(-1))


def test_crop_flip_matches_loop(device):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(3, 5, 2, 7, 9, generator=generator).to(device)  # [K, B, C, H, W], odd sizes
    pad = 3
    dy = torch.randint(0, 2 * pad + 1, (3, 5), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (3, 5), generator=generator)
    flip = torch.randint(0, 2, (3, 5), generator=generator).bool()
    out = data.crop_flip(images, dy, dx, flip, pad)
    assert out.shape == images.shape and out.device == images.device
    assert torch.equal(out.cpu(), crop_flip_loop(images.cpu(), dy, dx, flip, pad))


def test_augment_crop_flip_seeding(device):
    images = torch.randn(4, 6, 3, 8, 8).to(device)
    first = data.augment_crop_flip(images, torch.Generator().manual_seed(1))
    again = data.augment_crop_flip(images, torch.Generator().manual_seed(1))
    other = data.augment_crop_flip(images, torch.Generator().manual_seed(2))
    assert first.shape == images.shape
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert not torch.equal(first, images)
    # Padding 0 without flips is the identity; flips alone keep every row's values.
    assert torch.equal(data.augment_crop_flip(images, torch.Generator().manual_seed(1), pad=0, flip=False), images)
    flipped = data.augment_crop_flip(images, torch.Generator().manual_seed(1), pad=0)
    assert torch.equal(flipped.sort(-1).values, images.sort(-1).values)


# ----------------------------------------------------------------------------------------------
# Batches for K models
# ----------------------------------------------------------------------------------------------


def indexed_dataset(n, device, size=4):
    """Image i is filled with the value i and labelled i % 3: batches reveal which examples they hold."""
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, size, size).contiguous()
    return data.Dataset(images.to(device), (torch.arange(n) % 3).to(device), 3, "indexed",
                        torch.zeros(1, device=device), torch.ones(1, device=device))


def test_loader_epochs_are_permutations(device):
    dataset = indexed_dataset(23, device)
    loader = data.Loader(dataset, batch_size=5, seeds=[0, 1, 2], augment=False, drop_last=False)
    assert loader.steps_per_epoch == 5
    epochs = []
    for epoch in range(2):
        batches = list(loader.steps(epoch * 5, (epoch + 1) * 5))
        assert [b[0].shape for b in batches] == [(3, 5, 1, 4, 4)] * 4 + [(3, 3, 1, 4, 4)]
        order = torch.cat([inputs[:, :, 0, 0, 0] for inputs, _ in batches], dim=1).long().cpu()  # [K, 23]
        targets = torch.cat([t for _, t in batches], dim=1).cpu()
        assert torch.equal(targets, order % 3)
        for k in range(3):
            assert torch.equal(order[k].sort().values, torch.arange(23))
        assert not torch.equal(order[0], order[1]) and not torch.equal(order[1], order[2])
        epochs.append(order)
    assert not torch.equal(epochs[0], epochs[1])


def test_loader_drop_last(device):
    loader = data.Loader(indexed_dataset(23, device), batch_size=5, seeds=7, augment=False)
    assert loader.steps_per_epoch == 4
    seen = torch.cat([inputs[:, 0, 0, 0] for inputs, _ in loader.steps(0, 4)]).long()
    assert seen.shape == (20,) and len(seen.unique()) == 20
    inputs, targets = loader.batch(4)  # first batch of epoch 1
    assert inputs.shape == (5, 1, 4, 4) and targets.shape == (5,)


def test_loader_models_are_independent_and_resumable(digits, device):
    train = digits.train.to(device)
    stacked = data.Loader(train, batch_size=32, seeds=[3, 11])
    alone = data.Loader(train, batch_size=32, seeds=11)
    per_epoch = stacked.steps_per_epoch
    steps = list(stacked.steps(0, per_epoch + 3))  # into the second epoch
    inputs, targets = steps[0]
    assert inputs.shape == (2, 32, 1, 8, 8) and targets.shape == (2, 32) and inputs.device.type == device.type
    assert not torch.equal(inputs[0], inputs[1])
    # Model 1 of the stack sees what it sees trained alone (augmentation included).
    for t in (0, 5, per_epoch + 2):
        x, y = alone.batch(t)
        assert torch.equal(steps[t][0][1], x) and torch.equal(steps[t][1][1], y)
    # Resuming: a fresh loader jumped to step t gives the uninterrupted run's batch.
    resumed = data.Loader(train, batch_size=32, seeds=[3, 11])
    for t in (per_epoch + 2, 4, per_epoch + 1):
        x, y = resumed.batch(t)
        assert torch.equal(x, steps[t][0]) and torch.equal(y, steps[t][1])
    # The augmentation is on: some image differs from its raw version.
    order_free = data.Loader(train, batch_size=32, seeds=[3, 11], augment=False).batch(0)[0]
    assert not torch.equal(order_free, inputs)


def test_loader_rejects_bad_arguments(digits):
    with pytest.raises(ValueError, match="batch_size"):
        data.Loader(digits.train, batch_size=2000, seeds=0)
    with pytest.raises(ValueError, match=r"seeds\[1\]"):
        data.Loader(digits.train, batch_size=8, seeds=[0, -1])
    with pytest.raises(ValueError, match="seeds"):
        data.Loader(digits.train, batch_size=8, seeds=[])
    with pytest.raises(TypeError, match="dataset"):
        data.Loader(digits.train.images, batch_size=8, seeds=0)


# ----------------------------------------------------------------------------------------------
# imagefolder (needs torchvision)
# ----------------------------------------------------------------------------------------------


def test_imagefolder(tmp_path):
    pytest.importorskip("torchvision")
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("val", 2)):
        for name in ("cat", "dog"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / name / f"{i}.png")
    splits = data.load("imagefolder", root=tmp_path, size=16)
    assert splits.train.images.shape == (6, 3, 16, 16) and splits.test.images.shape == (4, 3, 16, 16)
    assert splits.train.classes == ("cat", "dog") and splits.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(FileNotFoundError, match="train"):
        data.load("imagefolder", root=tmp_path / "val")


def test_imagefolder_without_torchvision(tmp_path):
    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="torchvision"):
            data.load("imagefolder", root=tmp_path)
    else:
        pytest.skip("torchvision is installed")
