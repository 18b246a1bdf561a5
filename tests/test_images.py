"""Image datasets: digits, MNIST IDX / npz files and user npz arrays."""

from __future__ import annotations

import gzip
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from gancleanse.config import Config
from gancleanse.data import load_data
from gancleanse.errors import ConfigError, DataError


def _cfg(**data) -> Config:
    return Config.from_dict({"data": data, "train": {"batch_size": 1}})


# ----------------------------------------------------------------------------- digits
def test_digits_split_sizes_range_labels_and_no_reuse():
    s = load_data(_cfg(name="digits", n_train=1000, n_valid=400, n_test=397, seed=2))
    assert s.train.shape == (1000, 1, 8, 8) and s.valid.shape == (400, 1, 8, 8) and s.test.shape == (397, 1, 8, 8)
    assert s.train.dtype == torch.float64 and s.y_train.dtype == torch.int64
    assert float(s.train.min()) == -1.0 and float(s.train.max()) == 1.0

    ref = load_digits()
    # every split image (with its label) is a bundled image scaled by x / 8 - 1, and no bundled
    # image is used more often than it occurs (so the three splits are disjoint)
    available = Counter((img.tobytes(), int(t)) for img, t in zip(ref.images / 8.0 - 1.0, ref.target))
    used = Counter()
    for x, y in ((s.train, s.y_train), (s.valid, s.y_valid), (s.test, s.y_test)):
        for img, t in zip(x[:, 0].numpy(), y.tolist()):
            used[(np.ascontiguousarray(img).tobytes(), t)] += 1
    assert sum(used.values()) == 1797
    assert all(available[k] >= n for k, n in used.items())


def test_digits_split_is_seeded():
    a = load_data(_cfg(name="digits", n_train=100, n_valid=50, n_test=50, seed=4))
    b = load_data(_cfg(name="digits", n_train=100, n_valid=50, n_test=50, seed=4))
    c = load_data(_cfg(name="digits", n_train=100, n_valid=50, n_test=50, seed=5))
    assert torch.equal(a.train, b.train) and torch.equal(a.y_test, b.y_test)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert not torch.equal(a.train, c.train)


def test_digits_too_many_names_the_keys():
    with pytest.raises(DataError, match=r"data\.n_train = 1500 \+ data\.n_valid = 200 \+ data\.n_test = 200 "
                                        r"= 1900 exceeds the 1797"):
        load_data(_cfg(name="digits", n_train=1500, n_valid=200, n_test=200))


def _bilinear_reference(img: np.ndarray, out: int) -> np.ndarray:
    """Half-pixel bilinear resize written out in NumPy (separable, edge-clamped)."""
    n = img.shape[0]
    src = np.maximum((np.arange(out) + 0.5) * n / out - 0.5, 0.0)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n - 1)
    lam = src - i0
    m = np.zeros((out, n))
    m[np.arange(out), i0] += 1 - lam
    m[np.arange(out), i1] += lam
    return m @ img @ m.T


def test_digits_resize_matches_bilinear_reference():
    small = load_data(_cfg(name="digits", n_train=20, n_valid=5, n_test=5, seed=1))
    big = load_data(_cfg(name="digits", n_train=20, n_valid=5, n_test=5, seed=1, image_size=28))
    assert big.train.shape == (20, 1, 28, 28) and big.test.shape == (5, 1, 28, 28)
    assert float(big.train.min()) >= -1.0 and float(big.train.max()) <= 1.0
    assert torch.equal(small.y_train, big.y_train)
    for i in range(3):
        expected = _bilinear_reference(small.train[i, 0].numpy(), 28)
        np.testing.assert_allclose(big.train[i, 0].numpy(), expected, atol=1e-12)


# ------------------------------------------------------------------------------ MNIST
def _idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    head = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def _write_mnist(directory: Path, gz: bool, n_train: int = 40, n_test: int = 15, side: int = 6,
                 seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, side, side), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, side, side), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        data = _idx_bytes(arr, 2051 if arr.ndim == 3 else 2049)
        if gz:
            (directory / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (directory / name).write_bytes(data)
    return arrays


def _row_of(x: torch.Tensor, raw: np.ndarray) -> list[int]:
    """For each split image, the row of ``raw`` (uint8) it was scaled from."""
    scaled = raw.reshape(raw.shape[0], -1).astype(np.float64) / 127.5 - 1.0
    rows = []
    for img in x.reshape(x.shape[0], -1).numpy():
        hits = np.flatnonzero((scaled == img).all(axis=1))
        assert len(hits) == 1
        rows.append(int(hits[0]))
    return rows


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_paper_split(tmp_path, gz):
    raw = _write_mnist(tmp_path / "mnist", gz)
    s = load_data(_cfg(name="mnist", path=str(tmp_path / "mnist"), n_train=25, n_valid=10, n_test=7, seed=3))
    assert s.train.shape == (25, 1, 6, 6) and s.valid.shape == (10, 1, 6, 6) and s.test.shape == (7, 1, 6, 6)
    tr, va = _row_of(s.train, raw["train-images-idx3-ubyte"]), _row_of(s.valid, raw["train-images-idx3-ubyte"])
    assert len(set(tr) | set(va)) == 35  # distinct rows of the training file
    assert s.y_train.tolist() == raw["train-labels-idx1-ubyte"][tr].tolist()
    assert s.y_valid.tolist() == raw["train-labels-idx1-ubyte"][va].tolist()
    # test = the head of the t10k file, in order
    assert _row_of(s.test, raw["t10k-images-idx3-ubyte"]) == list(range(7))
    assert s.y_test.tolist() == raw["t10k-labels-idx1-ubyte"][:7].tolist()
    other = load_data(_cfg(name="mnist", path=str(tmp_path / "mnist"), n_train=25, n_valid=10, n_test=7, seed=4))
    assert not torch.equal(s.train, other.train) and torch.equal(s.test, other.test)


def test_mnist_npz_layouts_match_idx(tmp_path):
    raw = _write_mnist(tmp_path / "mnist", gz=False)
    np.savez(tmp_path / "keras.npz", x_train=raw["train-images-idx3-ubyte"], y_train=raw["train-labels-idx1-ubyte"],
             x_test=raw["t10k-images-idx3-ubyte"], y_test=raw["t10k-labels-idx1-ubyte"])
    kw = dict(name="mnist", n_train=20, n_valid=10, n_test=5, seed=1, image_size=8)
    a = load_data(_cfg(path=str(tmp_path / "mnist"), **kw))
    b = load_data(_cfg(path=str(tmp_path / "keras.npz"), **kw))
    assert a.train.shape == (20, 1, 8, 8)
    for f in ("train", "valid", "test", "y_train", "y_valid", "y_test"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    np.savez(tmp_path / "xy.npz", x=raw["train-images-idx3-ubyte"], y=raw["train-labels-idx1-ubyte"])
    c = load_data(_cfg(path=str(tmp_path / "xy.npz"), **kw))
    assert (c.train.shape[0], c.valid.shape[0], c.test.shape[0]) == (20, 10, 5)


def test_mnist_missing_file(tmp_path):
    _write_mnist(tmp_path / "m", gz=True)
    (tmp_path / "m" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"MNIST file not found: .*t10k-labels-idx1-ubyte"):
        load_data(_cfg(name="mnist", path=str(tmp_path / "m"), n_train=5, n_valid=5, n_test=5))
    with pytest.raises(DataError, match=r"data\.path not found: .*nowhere"):
        load_data(_cfg(name="mnist", path=str(tmp_path / "nowhere"), n_train=5, n_valid=5, n_test=5))


def test_mnist_wrong_magic(tmp_path):
    raw = _write_mnist(tmp_path / "m", gz=False)
    bad = _idx_bytes(raw["train-images-idx3-ubyte"], 2049)  # a labels magic on the image file
    (tmp_path / "m" / "train-images-idx3-ubyte").write_bytes(bad)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: wrong magic number 2049 \(expected 2051"):
        load_data(_cfg(name="mnist", path=str(tmp_path / "m"), n_train=5, n_valid=5, n_test=5))


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_truncated(tmp_path, gz):
    raw = _write_mnist(tmp_path / "m", gz=gz)
    data = _idx_bytes(raw["t10k-images-idx3-ubyte"], 2051)[:-10]
    name = "t10k-images-idx3-ubyte"
    if gz:
        (tmp_path / "m" / (name + ".gz")).write_bytes(gzip.compress(_idx_bytes(raw[name], 2051))[:-12])
        pattern = r"t10k-images-idx3-ubyte\.gz: truncated or corrupt gzip"
    else:
        (tmp_path / "m" / name).write_bytes(data)
        pattern = r"t10k-images-idx3-ubyte: truncated: header declares shape \(15, 6, 6\) = 540 bytes"
    with pytest.raises(DataError, match=pattern):
        load_data(_cfg(name="mnist", path=str(tmp_path / "m"), n_train=5, n_valid=5, n_test=5))


def test_mnist_count_errors(tmp_path):
    raw = _write_mnist(tmp_path / "m", gz=False)
    (tmp_path / "m" / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(raw["train-labels-idx1-ubyte"][:-1], 2049))
    with pytest.raises(DataError, match=r"holds 40 images but .*train-labels-idx1-ubyte holds 39 labels"):
        load_data(_cfg(name="mnist", path=str(tmp_path / "m"), n_train=5, n_valid=5, n_test=5))
    _write_mnist(tmp_path / "m", gz=False)
    with pytest.raises(DataError, match=r"data\.n_train = 35 \+ data\.n_valid = 10 = 45 exceeds the 40 images"):
        load_data(_cfg(name="mnist", path=str(tmp_path / "m"), n_train=35, n_valid=10, n_test=5))
    with pytest.raises(DataError, match=r"data\.n_test = 16 exceeds the 15 images available in .*t10k-images"):
        load_data(_cfg(name="mnist", path=str(tmp_path / "m"), n_train=5, n_valid=5, n_test=16))


def test_missing_path_is_a_config_error():
    for name in ("mnist", "npz"):
        with pytest.raises(ConfigError, match=rf"data\.name = '{name}' needs data\.path"):
            load_data(_cfg(name=name, n_train=5, n_valid=5, n_test=5))


# -------------------------------------------------------------------------------- npz
def test_npz_uint8_scaled_and_split(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (30, 5, 5), dtype=np.uint8)
    x[0, 0, 0], x[1, 0, 0] = 0, 255
    np.savez(tmp_path / "d.npz", x=x)
    s = load_data(_cfg(name="npz", path=str(tmp_path / "d.npz"), n_train=10, n_valid=10, n_test=10, seed=7))
    assert s.y_train is None and s.train.shape == (10, 1, 5, 5)
    rows = _row_of(s.train, x) + _row_of(s.valid, x) + _row_of(s.test, x)
    assert sorted(rows) == list(range(30))
    allx = torch.cat([s.train, s.valid, s.test])
    assert float(allx.min()) == -1.0 and float(allx.max()) == 1.0


def test_npz_float_channels_used_as_is(tmp_path):
    x = np.random.default_rng(2).uniform(-1, 1, (12, 3, 4, 4))
    y = np.arange(12) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    s = load_data(_cfg(name="npz", path=str(tmp_path / "d.npz"), n_train=6, n_valid=3, n_test=3, seed=0))
    assert s.train.shape == (6, 3, 4, 4)
    for img, label in zip(s.train, s.y_train):
        j = int(np.flatnonzero((x == img.numpy()).all(axis=(1, 2, 3)))[0])
        assert y[j] == int(label)


def test_npz_errors(tmp_path):
    kw = dict(name="npz", n_train=2, n_valid=1, n_test=1)
    np.savez(tmp_path / "nox.npz", images=np.zeros((4, 3, 3), np.uint8))
    with pytest.raises(DataError, match=r"nox\.npz: no array named 'x' \(found: images\)"):
        load_data(_cfg(path=str(tmp_path / "nox.npz"), **kw))
    bad = np.zeros((4, 3, 3))
    bad[1, 1, 1] = np.nan
    np.savez(tmp_path / "nan.npz", x=bad)
    with pytest.raises(DataError, match=r"nan\.npz:x: image array contains NaN"):
        load_data(_cfg(path=str(tmp_path / "nan.npz"), **kw))
    np.savez(tmp_path / "flat.npz", x=np.zeros((4, 9)))
    with pytest.raises(DataError, match=r"expected images of shape \(N, H, W\) or \(N, C, H, W\), got shape \(4, 9\)"):
        load_data(_cfg(path=str(tmp_path / "flat.npz"), **kw))
    np.savez(tmp_path / "last.npz", x=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(DataError, match=r"look channels-last"):
        load_data(_cfg(path=str(tmp_path / "last.npz"), **kw))
    np.savez(tmp_path / "big.npz", x=np.full((4, 3, 3), 300, np.int32))
    with pytest.raises(DataError, match=r"integer pixels must lie in 0\.\.255, found 300\.\.300"):
        load_data(_cfg(path=str(tmp_path / "big.npz"), **kw))
    np.savez(tmp_path / "y.npz", x=np.zeros((4, 3, 3), np.uint8), y=np.zeros(3, np.int64))
    with pytest.raises(DataError, match=r"y\.npz:y: labels must have shape \(4,\)"):
        load_data(_cfg(path=str(tmp_path / "y.npz"), **kw))
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(DataError, match=r"junk\.npz: not a readable \.npz file"):
        load_data(_cfg(path=str(tmp_path / "junk.npz"), **kw))
    with pytest.raises(DataError, match=r"data file not found: .*absent\.npz"):
        load_data(_cfg(path=str(tmp_path / "absent.npz"), **kw))
    np.savez(tmp_path / "few.npz", x=np.zeros((3, 3, 3), np.uint8))
    with pytest.raises(DataError, match=r"= 4 exceeds the 3 images available in .*few\.npz"):
        load_data(_cfg(path=str(tmp_path / "few.npz"), **kw))
