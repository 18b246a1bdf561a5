"""`[data] name = "images"`: a user's image folder, StyleGAN zip or .npy/.npz read by `load_images`.

Every expectation is computed independently of the loader: from the arrays written to disk,
or by decoding / resizing the same files with Pillow directly.
"""

from __future__ import annotations

import csv
import io
import json
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gancleanse.cli import main
from gancleanse.config import Config
from gancleanse.data.base import as_float
from gancleanse.data.image_files import load_images
from gancleanse.errors import ConfigError, DataError, GancleanseWarning


# ---------------------------------------------------------------------------- helpers
def dcfg(**data):
    """A validated DataConfig for the images loader (small valid / test splits by default)."""
    data = {"name": "images", "n_valid": 1, "n_test": 1, **data}
    if "path" in data:
        data["path"] = str(data["path"])
    return Config.from_dict({"data": data, "train": {"batch_size": 1}}).data


def rand_img(rng: np.random.Generator, h: int, w: int, c: int | None = 3) -> np.ndarray:
    """HxW (gray) or HxWx3 uint8 pixels covering the whole 0..255 range."""
    shape = (h, w) if c is None else (h, w, c)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def save(path: Path, arr: np.ndarray, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)
    return path


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def chw(arr: np.ndarray) -> np.ndarray:
    """HxW or HxWxC -> CxHxW."""
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def rows_by_key(splits) -> dict[str, tuple[np.ndarray, int | None]]:
    """{key: (pixels (C, H, W), label or None)} over the three splits."""
    out = {}
    for name in ("train", "valid", "test"):
        x = getattr(splits, name).numpy()
        y = getattr(splits, f"y_{name}")
        keys = splits.keys[name]
        assert len(keys) == x.shape[0]
        for j, k in enumerate(keys):
            assert k not in out, f"key {k!r} in two splits"
            out[k] = (x[j], None if y is None else int(y[j]))
    return out


def assert_holds_exactly(splits, written: dict[str, np.ndarray]) -> None:
    """The splits hold exactly the written images (by key), each with the pixels written."""
    rows = rows_by_key(splits)
    assert sorted(rows) == sorted(written)
    for key, arr in written.items():
        assert np.array_equal(rows[key][0], chw(arr)), key


def all_keys(splits) -> list[str]:
    return [k for name in ("train", "valid", "test") for k in splits.keys[name]]


# ----------------------------------------------------------------------- folder, flat
def test_flat_folder_exact_pixels_sorted_keys_and_ignored_files(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    written = {}
    for key in ["b.png", "a.png", "c10.png", "c2.png", "sub/deeper/z.png", "sub/y.png", "A_upper.PNG"]:
        written[key] = rand_img(rng, 6, 6)
        save(root / key, written[key], fmt="PNG")
    # never images: text, macOS metadata, hidden files and folders
    (root / "notes.txt").write_text("not an image")
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1" + bytes(100))
    save(root / ".hidden.png", rand_img(rng, 6, 6))
    save(root / ".cache" / "thumb.png", rand_img(rng, 6, 6))
    save(root / "sub" / ".git" / "x.png", rand_img(rng, 6, 6))

    s = load_images(dcfg(path=root, n_valid=2, n_test=1))
    assert s.train.dtype == torch.uint8
    assert s.train.shape == (4, 3, 6, 6) and s.valid.shape == (2, 3, 6, 6) and s.test.shape == (1, 3, 6, 6)
    assert s.y_train is None and s.y_valid is None and s.y_test is None
    assert sorted(all_keys(s)) == sorted(written)  # relative posix paths, nothing else
    rows = rows_by_key(s)
    for key, arr in written.items():
        assert np.array_equal(rows[key][0], chw(arr)), key
    assert s.source["format"] == "folder"
    assert s.source["n_files"] == 7 and s.source["skipped"] == []


def test_keys_are_sorted_relative_paths_when_split_is_identity(tmp_path):
    """With one instance per split the union is the sorted list; check the sort order directly."""
    rng = np.random.default_rng(1)
    root = tmp_path / "d"
    names = ["z.png", "a/b.png", "a.png", "a/a/c.png", "B.png"]
    for n in names:
        save(root / n, rand_img(rng, 4, 4))
    s = load_images(dcfg(path=root, n_valid=1, n_test=1))
    assert sorted(all_keys(s)) == sorted(names)
    assert all("\\" not in k and not k.startswith("/") for k in all_keys(s))


def test_as_float_maps_loaded_pixels_to_minus_one_one(tmp_path):
    root = tmp_path / "d"
    arr = np.arange(0, 256, dtype=np.uint8).reshape(16, 16)
    arr3 = np.stack([arr, 255 - arr, np.full_like(arr, 128)], axis=-1)
    for i in range(3):
        save(root / f"{i}.png", arr3)
    s = load_images(dcfg(path=root))
    f = as_float(s.train)
    expected = torch.from_numpy(chw(arr3).astype(np.float64) * (2.0 / 255.0) - 1.0)
    assert f.dtype == torch.float64
    assert torch.allclose(f[0], expected, atol=1e-12, rtol=0)
    assert float(f.min()) == -1.0 and float(f.max()) == 1.0


def test_labels_auto_on_class_subfolders_gives_no_labels(tmp_path):
    rng = np.random.default_rng(2)
    for n in ["cat/1.png", "cat/2.png", "dog/1.png", "dog/2.png"]:
        save(tmp_path / "d" / n, rand_img(rng, 4, 4))
    s = load_images(dcfg(path=tmp_path / "d"))
    assert s.y_train is None and s.y_valid is None and s.y_test is None


# ---------------------------------------------------------------- folder, class folders
def test_class_subfolders_give_sorted_folder_index_labels(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "d"
    files = {"dog/d1.png": 2, "dog/puppies/p1.png": 2, "dog/puppies/deep/p2.png": 2,
             "ant/a1.png": 0, "ant/a2.png": 0, "cat/c1.png": 1, "cat/c2.png": 1, "cat/c3.png": 1}
    written = {}
    for key in files:
        written[key] = rand_img(rng, 5, 5)
        save(root / key, written[key])
    (root / "cat" / "notes.txt").write_text("x")
    (root / "dog" / ".DS_Store").write_bytes(b"junk")
    s = load_images(dcfg(path=root, labels="folders", n_valid=2, n_test=2))
    assert s.source["label_names"] == ["ant", "cat", "dog"]
    for y in (s.y_train, s.y_valid, s.y_test):
        assert y is not None and y.dtype == torch.int64
    rows = rows_by_key(s)
    assert sorted(rows) == sorted(files)
    for key, label in files.items():
        assert rows[key][1] == label, key
        assert np.array_equal(rows[key][0], chw(written[key])), key


def test_labels_none_ignores_class_folders(tmp_path):
    rng = np.random.default_rng(4)
    for n in ["a/1.png", "b/1.png", "b/2.png"]:
        save(tmp_path / "d" / n, rand_img(rng, 4, 4))
    s = load_images(dcfg(path=tmp_path / "d", labels="none"))
    assert s.y_train is None and s.y_valid is None and s.y_test is None


def test_labels_folders_with_top_level_image_is_an_error_naming_it(tmp_path):
    rng = np.random.default_rng(5)
    for n in ["a/1.png", "b/1.png", "stray.png"]:
        save(tmp_path / "d" / n, rand_img(rng, 4, 4))
    with pytest.raises(DataError, match=r"stray\.png"):
        load_images(dcfg(path=tmp_path / "d", labels="folders"))


def test_folder_dataset_json_labels(tmp_path):
    rng = np.random.default_rng(6)
    root = tmp_path / "d"
    labels = {"x/1.png": 4, "x/2.png": 0, "y/3.png": 7, "4.png": 2}
    for k in labels:
        save(root / k, rand_img(rng, 4, 4))
    (root / "dataset.json").write_text(json.dumps({"labels": [[k, v] for k, v in labels.items()]}))
    rows = rows_by_key(load_images(dcfg(path=root)))
    assert {k: v[1] for k, v in rows.items()} == labels


# ----------------------------------------------------------------------------- split
def _folder_of(tmp_path: Path, n: int, size: int = 4, seed: int = 7) -> Path:
    rng = np.random.default_rng(seed)
    root = tmp_path / "many"
    for i in range(n):
        save(root / f"g{i % 3}" / f"img{i:03d}.png", rand_img(rng, size, size))
    return root


def test_split_is_seeded_disjoint_and_covers_the_counts(tmp_path):
    root = _folder_of(tmp_path, 30)
    a = load_images(dcfg(path=root, n_train=10, n_valid=5, n_test=6, seed=0))
    b = load_images(dcfg(path=root, n_train=10, n_valid=5, n_test=6, seed=0))
    c = load_images(dcfg(path=root, n_train=10, n_valid=5, n_test=6, seed=1))
    assert a.keys == b.keys
    assert a.keys != c.keys
    assert [len(a.keys[n]) for n in ("train", "valid", "test")] == [10, 5, 6]
    assert a.train.shape[0] == 10 and a.valid.shape[0] == 5 and a.test.shape[0] == 6
    for s in (a, c):
        ks = all_keys(s)
        assert len(set(ks)) == 21  # disjoint
        assert all((root / k).is_file() for k in ks)
    # same seed -> identical tensors
    assert torch.equal(a.train, b.train) and torch.equal(a.valid, b.valid) and torch.equal(a.test, b.test)


def test_split_n_train_none_takes_the_rest(tmp_path):
    root = _folder_of(tmp_path, 30)
    s = load_images(dcfg(path=root, n_valid=4, n_test=7, seed=3))
    assert [len(s.keys[n]) for n in ("train", "valid", "test")] == [19, 4, 7]
    every = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    assert sorted(all_keys(s)) == every


def test_split_rows_match_the_files_named_by_the_keys(tmp_path):
    root = _folder_of(tmp_path, 25)
    s = load_images(dcfg(path=root, n_train=12, n_valid=6, n_test=5, seed=11))
    for name in ("train", "valid", "test"):
        x = getattr(s, name).numpy()
        for j, key in enumerate(s.keys[name]):
            with Image.open(root / key) as im:
                expected = chw(np.asarray(im.convert("RGB")))
            assert np.array_equal(x[j], expected), (name, key)


def test_split_asking_for_too_many_is_an_error_naming_the_keys(tmp_path):
    root = _folder_of(tmp_path, 10)
    with pytest.raises(DataError, match=r"data\.n_train"):
        load_images(dcfg(path=root, n_train=8, n_valid=2, n_test=2))
    with pytest.raises(DataError, match=r"data\.n_valid"):
        load_images(dcfg(path=root, n_valid=6, n_test=4))


# ------------------------------------------------------------------------------- zip
def _stylegan_zip(path: Path, n: int, meta: object | None, extra: dict[str, bytes] | None = None,
                  seed: int = 8) -> dict[str, np.ndarray]:
    """A zip as StyleGAN2-ADA's dataset_tool writes it: 00000/img00000000.png, ... + dataset.json."""
    rng = np.random.default_rng(seed)
    written = {}
    with zipfile.ZipFile(path, "w") as z:
        for i in range(n):
            key = f"{i // 4:05d}/img{i:08d}.png"
            written[key] = rand_img(rng, 8, 8)
            z.writestr(key, png_bytes(written[key]))
        if meta is not None:
            z.writestr("dataset.json", json.dumps(meta))
        for name, raw in (extra or {}).items():
            z.writestr(name, raw)
    return written


def test_zip_with_dataset_json_labels(tmp_path):
    path = tmp_path / "ds.zip"
    labels = {f"{i // 4:05d}/img{i:08d}.png": (i * 7) % 5 for i in range(10)}
    junk = {"__MACOSX/00000/._img00000000.png": b"\0\5\26\7junk", "README.txt": b"hello",
            "00001/.hidden.png": png_bytes(np.zeros((8, 8, 3), np.uint8))}
    written = _stylegan_zip(path, 10, {"labels": [[k, v] for k, v in labels.items()]}, junk)
    s = load_images(dcfg(path=path, n_valid=2, n_test=3))
    assert s.source["format"] == "zip"
    rows = rows_by_key(s)
    assert sorted(rows) == sorted(written)
    for key, arr in written.items():
        assert np.array_equal(rows[key][0], chw(arr)), key
        assert rows[key][1] == labels[key], key
    assert s.train.shape == (5, 3, 8, 8)


@pytest.mark.parametrize("meta", [{"labels": None}, None], ids=["labels-null", "no-dataset-json"])
def test_zip_without_labels(tmp_path, meta):
    path = tmp_path / "ds.zip"
    written = _stylegan_zip(path, 6, meta)
    s = load_images(dcfg(path=path))
    assert s.y_train is None and s.y_valid is None and s.y_test is None
    assert_holds_exactly(s, written)


def test_zip_dataset_json_missing_a_label_names_the_image(tmp_path):
    path = tmp_path / "ds.zip"
    keys = [f"{i // 4:05d}/img{i:08d}.png" for i in range(6)]
    missing = keys[3]
    _stylegan_zip(path, 6, {"labels": [[k, 1] for k in keys if k != missing]})
    with pytest.raises(DataError, match=missing.replace(".", r"\.")):
        load_images(dcfg(path=path))


def test_zip_corrupt_member_names_it(tmp_path):
    path = tmp_path / "ds.zip"
    _stylegan_zip(path, 5, None, {"00009/bad.png": b"\x89PNG not really" + bytes(50)})
    with pytest.raises(DataError, match=r"00009/bad\.png.*skip_bad_files"):
        load_images(dcfg(path=path))


def test_file_named_zip_that_is_not_a_zip_is_an_error(tmp_path):
    path = tmp_path / "fake.zip"
    path.write_bytes(b"definitely not a zip archive" * 10)
    with pytest.raises(DataError, match=r"fake\.zip"):
        load_images(dcfg(path=path))


# ---------------------------------------------------------------------------- arrays
def test_npy_nhwc_uint8(tmp_path):
    rng = np.random.default_rng(9)
    arr = rng.integers(0, 256, size=(9, 5, 5, 3), dtype=np.uint8)
    path = tmp_path / "x.npy"
    np.save(path, arr)
    s = load_images(dcfg(path=path, n_valid=2, n_test=2))
    assert s.train.dtype == torch.uint8 and s.train.shape == (5, 3, 5, 5)
    assert s.y_train is None
    assert_holds_exactly(s, {f"#{i}": arr[i] for i in range(9)})


def test_npy_gray_nhw(tmp_path):
    rng = np.random.default_rng(10)
    arr = rng.integers(0, 256, size=(5, 6, 6), dtype=np.uint8)
    path = tmp_path / "g.npy"
    np.save(path, arr)
    s = load_images(dcfg(path=path))
    assert s.train.shape[1:] == (1, 6, 6)
    assert_holds_exactly(s, {f"#{i}": arr[i] for i in range(5)})


def test_npz_arr_0_nhwc(tmp_path):
    rng = np.random.default_rng(11)
    arr = rng.integers(0, 256, size=(7, 5, 6, 3), dtype=np.uint8)
    path = tmp_path / "a.npz"
    np.savez(path, arr)  # stored as arr_0
    s = load_images(dcfg(path=path))
    assert_holds_exactly(s, {f"#{i}": arr[i] for i in range(7)})


def test_npz_x_y_nchw_float_values_kept(tmp_path):
    rng = np.random.default_rng(12)
    x = rng.uniform(-1.0, 1.0, size=(8, 3, 4, 4)).astype(np.float32)
    x[0, 0, 0, 0], x[1, 1, 1, 1] = -1.0, 1.0
    y = np.array([3, 1, 4, 1, 5, 9, 2, 6], dtype=np.int64)
    path = tmp_path / "xy.npz"
    np.savez(path, x=x, y=y)
    s = load_images(dcfg(path=path, n_valid=2, n_test=2, seed=5))
    assert s.train.shape == (4, 3, 4, 4)
    assert s.train.dtype.is_floating_point
    for name in ("train", "valid", "test"):
        xs = getattr(s, name)
        fl = as_float(xs)
        ys = getattr(s, f"y_{name}")
        for j, key in enumerate(s.keys[name]):
            assert key.startswith("#")
            i = int(key[1:])
            assert np.array_equal(xs[j].numpy(), x[i]), key
            assert torch.equal(fl[j], torch.from_numpy(x[i].astype(np.float64))), key
            assert int(ys[j]) == y[i], key
    assert s.source["array"] == "x"


def test_npz_labels_none_drops_y(tmp_path):
    x = np.zeros((5, 1, 4, 4), np.uint8)
    path = tmp_path / "xy.npz"
    np.savez(path, x=x, y=np.arange(5))
    s = load_images(dcfg(path=path, labels="none"))
    assert s.y_train is None


def test_npz_without_x_or_arr_0_names_the_file_and_what_it_has(tmp_path):
    path = tmp_path / "weird.npz"
    np.savez(path, images=np.zeros((3, 4, 4), np.uint8), y=np.arange(3))
    with pytest.raises(DataError, match=r"weird\.npz.*(x|arr_0).*images"):
        load_images(dcfg(path=path))


def test_labels_folders_on_an_array_is_a_config_error(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(ConfigError, match=r"folders"):
        load_images(dcfg(path=path, labels="folders"))


def test_npy_with_image_size_resizes_like_pil(tmp_path):
    rng = np.random.default_rng(13)
    arr = rng.integers(0, 256, size=(4, 8, 12, 3), dtype=np.uint8)  # H=8, W=12
    path = tmp_path / "x.npy"
    np.save(path, arr)
    s = load_images(dcfg(path=path, image_size=4))
    rows = rows_by_key(s)
    for i in range(4):
        expected = chw(_pil_short_side_center_crop(Image.fromarray(arr[i]), 4, Image.Resampling.LANCZOS))
        assert np.array_equal(rows[f"#{i}"][0], expected), i


# ------------------------------------------------------------------- gray and colour
def test_gray_pngs_load_with_one_channel(tmp_path):
    rng = np.random.default_rng(14)
    written = {f"{i}.png": rand_img(rng, 5, 5, None) for i in range(4)}
    for k, a in written.items():
        save(tmp_path / "d" / k, a)
    s = load_images(dcfg(path=tmp_path / "d"))
    assert s.train.shape[1] == 1
    rows = rows_by_key(s)
    for k, a in written.items():
        assert np.array_equal(rows[k][0], a[None]), k


@pytest.mark.parametrize("order", ["gray-first", "rgb-first"])
def test_gray_and_rgb_mix_gives_three_channels_with_gray_repeated(tmp_path, order):
    rng = np.random.default_rng(15)
    gray_names, rgb_names = (["a.png", "c.png"], ["b.png", "d.png"])
    if order == "rgb-first":
        gray_names, rgb_names = rgb_names, gray_names
    written = {}
    for k in gray_names:
        written[k] = rand_img(rng, 5, 5, None)
    for k in rgb_names:
        written[k] = rand_img(rng, 5, 5)
    for k, a in written.items():
        save(tmp_path / "d" / k, a)
    s = load_images(dcfg(path=tmp_path / "d"))
    assert s.train.shape[1] == 3
    rows = rows_by_key(s)
    for k, a in written.items():
        expected = np.repeat(a[None], 3, axis=0) if a.ndim == 2 else chw(a)
        assert np.array_equal(rows[k][0], expected), k


def test_channels_1_on_rgb_uses_pil_luma(tmp_path):
    rng = np.random.default_rng(16)
    root = tmp_path / "d"
    for i in range(4):
        save(root / f"{i}.png", rand_img(rng, 6, 6))
    s = load_images(dcfg(path=root, channels=1))
    assert s.train.shape[1] == 1
    for k, (x, _) in rows_by_key(s).items():
        with Image.open(root / k) as im:
            expected = np.asarray(im.convert("L"))
        assert np.array_equal(x, expected[None]), k


def test_channels_3_on_gray_repeats(tmp_path):
    rng = np.random.default_rng(17)
    written = {f"{i}.png": rand_img(rng, 5, 5, None) for i in range(4)}
    for k, a in written.items():
        save(tmp_path / "d" / k, a)
    s = load_images(dcfg(path=tmp_path / "d", channels=3))
    assert s.train.shape[1] == 3
    for k, (x, _) in rows_by_key(s).items():
        assert np.array_equal(x, np.repeat(written[k][None], 3, axis=0)), k


def test_rgba_and_palette_images_become_rgb_like_pil(tmp_path):
    rng = np.random.default_rng(18)
    root = tmp_path / "d"
    save(root / "rgba.png", rng.integers(0, 256, size=(5, 5, 4), dtype=np.uint8))
    Image.fromarray(rand_img(rng, 5, 5)).convert("P").save(root / "pal.png")
    save(root / "rgb.png", rand_img(rng, 5, 5))
    s = load_images(dcfg(path=root))
    assert s.train.shape[1] == 3
    for k, (x, _) in rows_by_key(s).items():
        with Image.open(root / k) as im:
            assert np.array_equal(x, chw(np.asarray(im.convert("RGB")))), k


def test_other_file_formats_decode_like_pil(tmp_path):
    rng = np.random.default_rng(19)
    root = tmp_path / "d"
    lossless = {"a.bmp": "BMP", "b.tif": "TIFF", "c.PNG": "PNG", "d.webp": "WEBP"}
    written = {}
    for name, fmt in lossless.items():
        written[name] = rand_img(rng, 6, 6)
        buf = io.BytesIO()
        Image.fromarray(written[name]).save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        (root).mkdir(exist_ok=True)
        (root / name).write_bytes(buf.getvalue())
    save(root / "e.jpg", rand_img(rng, 6, 6), fmt="JPEG")
    s = load_images(dcfg(path=root))
    rows = rows_by_key(s)
    assert sorted(rows) == sorted([*lossless, "e.jpg"])
    for k, a in written.items():
        assert np.array_equal(rows[k][0], chw(a)), k
    with Image.open(root / "e.jpg") as im:
        assert np.array_equal(rows["e.jpg"][0], chw(np.asarray(im.convert("RGB"))))


# ------------------------------------------------------------------------- resizing
def _pil_short_side_center_crop(img: Image.Image, s: int, flt) -> np.ndarray:
    """Independent reference: resize the short side to s (long side rounded), crop the centre.

    Test sizes are chosen so that the long side minus s is even, where 'centre' is unambiguous.
    """
    w, h = img.size
    if w <= h:
        nw, nh = s, int(round(h * s / w))
    else:
        nw, nh = int(round(w * s / h)), s
    assert (nw - s) % 2 == 0 and (nh - s) % 2 == 0, "pick test sizes with an unambiguous centre"
    r = img.resize((nw, nh), flt)
    left, top = (nw - s) // 2, (nh - s) // 2
    return np.asarray(r.crop((left, top, left + s, top + s)))


@pytest.mark.parametrize("resample,flt", [("lanczos", Image.Resampling.LANCZOS),
                                          ("nearest", Image.Resampling.NEAREST),
                                          ("bilinear", Image.Resampling.BILINEAR)])
def test_non_square_images_short_side_then_centre_crop(tmp_path, resample, flt):
    rng = np.random.default_rng(20)
    root = tmp_path / "d"
    # (w, h): wide, tall, upscaled small, non-integer scale, already square but bigger;
    # each gives an even margin after the resize, so the centre is unambiguous
    sizes = {"wide.png": (16, 8), "tall.png": (4, 12), "small.png": (3, 5), "frac.png": (9, 7),
             "sq.png": (12, 12)}
    written = {}
    for k, (w, h) in sizes.items():
        written[k] = rand_img(rng, h, w)
        save(root / k, written[k])
    s = load_images(dcfg(path=root, image_size=6, resample=resample))
    assert s.train.shape[1:] == (3, 6, 6)
    rows = rows_by_key(s)
    for k, a in written.items():
        expected = _pil_short_side_center_crop(Image.fromarray(a), 6, flt)
        assert np.array_equal(rows[k][0], chw(expected)), k


def test_mixed_sizes_without_image_size_is_an_error_naming_the_key(tmp_path):
    rng = np.random.default_rng(21)
    save(tmp_path / "d" / "a.png", rand_img(rng, 6, 6))
    save(tmp_path / "d" / "b.png", rand_img(rng, 6, 6))
    save(tmp_path / "d" / "c.png", rand_img(rng, 8, 6))
    with pytest.raises(DataError, match=r"data\.image_size") as e:
        load_images(dcfg(path=tmp_path / "d"))
    assert "c.png" in str(e.value)


def test_images_already_at_image_size_are_not_resampled(tmp_path):
    rng = np.random.default_rng(22)
    root = tmp_path / "d"
    written = {f"{i}.png": rand_img(rng, 6, 6) for i in range(3)}
    written["big.png"] = rand_img(rng, 12, 12)
    for k, a in written.items():
        save(root / k, a)
    s = load_images(dcfg(path=root, image_size=6))
    rows = rows_by_key(s)
    for k in ("0.png", "1.png", "2.png"):
        assert rows[k][0].tobytes() == chw(written[k]).tobytes(), k
    expected = _pil_short_side_center_crop(Image.fromarray(written["big.png"]), 6, Image.Resampling.LANCZOS)
    assert np.array_equal(rows["big.png"][0], chw(expected))


# ---------------------------------------------------------------------------- errors
def test_empty_folder_is_an_error_naming_it(tmp_path):
    root = tmp_path / "empty_dataset"
    root.mkdir()
    with pytest.raises(DataError, match=r"empty_dataset"):
        load_images(dcfg(path=root))


def test_folder_with_only_non_images_is_an_error_naming_it(tmp_path):
    root = tmp_path / "no_images_here"
    root.mkdir()
    (root / "notes.txt").write_text("hi")
    (root / ".DS_Store").write_bytes(b"junk")
    save(root / ".hidden.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match=r"no_images_here"):
        load_images(dcfg(path=root))


def _bad_bytes(kind: str) -> bytes:
    if kind == "random":
        return np.random.default_rng(23).integers(0, 256, size=200, dtype=np.uint8).tobytes()
    if kind == "empty":
        return b""
    good = png_bytes(np.random.default_rng(24).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    return good[: len(good) // 2]  # truncated PNG: valid header, missing data


@pytest.mark.parametrize("kind", ["random", "empty", "truncated"])
def test_corrupt_file_names_it_and_mentions_skip_bad_files(tmp_path, kind):
    rng = np.random.default_rng(25)
    root = tmp_path / "d"
    for i in range(4):
        save(root / f"ok{i}.png", rand_img(rng, 4, 4))
    (root / "x.png").write_bytes(_bad_bytes(kind))
    with pytest.raises(DataError, match=r"x\.png.*skip_bad_files"):
        load_images(dcfg(path=root))


@pytest.mark.parametrize("kind", ["random", "empty", "truncated"])
def test_skip_bad_files_skips_warns_and_records(tmp_path, kind):
    rng = np.random.default_rng(26)
    root = tmp_path / "d"
    written = {f"ok{i}.png": rand_img(rng, 4, 4) for i in range(4)}
    for k, a in written.items():
        save(root / k, a)
    (root / "x.png").write_bytes(_bad_bytes(kind))
    with pytest.warns(GancleanseWarning, match=r"x\.png"):
        s = load_images(dcfg(path=root, skip_bad_files=True))
    assert [item[0] for item in s.source["skipped"]] == ["x.png"]
    assert_holds_exactly(s, written)


def test_skip_bad_files_with_no_good_file_left_is_an_error(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    (root / "x.png").write_bytes(b"garbage" * 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match=r"unreadable|readable"):
            load_images(dcfg(path=root, skip_bad_files=True))


def test_missing_path_is_an_error_naming_it(tmp_path):
    with pytest.raises(DataError, match=r"does_not_exist"):
        load_images(dcfg(path=tmp_path / "does_not_exist"))


def test_path_that_is_a_text_file_is_an_error_naming_it(tmp_path):
    p = tmp_path / "list_of_images.txt"
    p.write_text("a.png\nb.png\n")
    with pytest.raises(DataError, match=r"list_of_images\.txt"):
        load_images(dcfg(path=p))


def test_no_path_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"data\.path"):
        load_images(dcfg())


# ------------------------------------------------------------------------ fingerprint
def test_fingerprint_tracks_file_bytes(tmp_path):
    rng = np.random.default_rng(27)
    root = tmp_path / "d"
    written = {f"{i}.png": rand_img(rng, 5, 5) for i in range(6)}
    for k, a in written.items():
        save(root / k, a)
    (root / "notes.txt").write_text("v1")
    fp1 = load_images(dcfg(path=root)).fingerprint()
    fp2 = load_images(dcfg(path=root)).fingerprint()
    assert fp1 == fp2
    # a non-image file is not part of the dataset
    (root / "notes.txt").write_text("v2")
    assert load_images(dcfg(path=root)).fingerprint() == fp1
    # a different split of the same files
    assert load_images(dcfg(path=root, seed=1)).fingerprint() != fp1
    # one pixel of one image changed
    changed = written["3.png"].copy()
    changed[2, 2, 1] ^= 1
    save(root / "3.png", changed)
    fp3 = load_images(dcfg(path=root)).fingerprint()
    assert fp3 != fp1


def test_fingerprint_of_an_array_file_tracks_its_bytes(tmp_path):
    arr = np.random.default_rng(28).integers(0, 256, size=(5, 4, 4, 3), dtype=np.uint8)
    path = tmp_path / "x.npy"
    np.save(path, arr)
    fp1 = load_images(dcfg(path=path)).fingerprint()
    assert load_images(dcfg(path=path)).fingerprint() == fp1
    arr[4, 3, 3, 2] ^= 1
    np.save(path, arr)
    assert load_images(dcfg(path=path)).fingerprint() != fp1


# ------------------------------------------------------------------------------- CLI
def _write_cli_config(path: Path, data_path: Path) -> None:
    path.write_text(f"""\
[data]
name = "images"
path = {json.dumps(str(data_path))}
labels = "folders"
n_valid = 10
n_test = 10
seed = 2

[model]
arch = "mlp"
z_dim = 3
g_hidden = 8
d_hidden = 8
activation = "softplus"

[train]
epochs = 1
batch_size = 10
checkpoint_every = 2
""")


def test_cli_train_and_influence_on_an_image_folder(tmp_path, capsys):
    rng = np.random.default_rng(29)
    data = tmp_path / "imgs"
    for i in range(60):
        save(data / ("abc"[i % 3]) / f"{i:02d}.png", rand_img(rng, 16, 16))
    (data / "README.txt").write_text("not an image")
    cfg = tmp_path / "cfg.toml"
    _write_cli_config(cfg, data)
    run_dir = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(run_dir), "-q"]) == 0
    scores = tmp_path / "scores.csv"
    assert main(["influence", "--check", "0", str(run_dir), "--metric", "loss_d", "--out", str(scores), "-q"]) == 0

    splits = json.loads((run_dir / "splits.json").read_text())
    assert len(splits["train"]) == 40 and len(splits["valid"]) == 10 and len(splits["test"]) == 10
    every = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.png"))
    assert sorted(splits["train"] + splits["valid"] + splits["test"]) == every
    assert all((data / k).is_file() for k in splits["train"])

    with open(scores, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["index", "influence", "harmfulness", "key"]
    body = rows[1:]
    assert [int(r[0]) for r in body] == list(range(40))
    assert [r[3] for r in body] == splits["train"]
    assert all(np.isfinite(float(r[1])) and np.isfinite(float(r[2])) for r in body)

    # the same data with one unreadable file: exit status 2, one line naming it, no run directory
    bad = tmp_path / "imgs_bad"
    for p in data.rglob("*.png"):
        save(bad / p.relative_to(data), np.asarray(Image.open(p)))
    (bad / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    bad_cfg = tmp_path / "bad.toml"
    _write_cli_config(bad_cfg, bad)
    capsys.readouterr()
    bad_run = tmp_path / "bad_run"
    assert main(["train", str(bad_cfg), "--out", str(bad_run), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "broken.png" in err and err.startswith("gancleanse: error:")
    assert not bad_run.exists()
    assert not any(p.name.startswith("bad_run") for p in tmp_path.iterdir())


# ------------------------------------------------------------- edge cases of real folders
def test_16bit_gray_png_keeps_its_levels(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    a = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0..65535
    for i in range(3):
        Image.fromarray(a).save(root / f"{i}.png")
    try:
        s = load_images(dcfg(path=root))
    except DataError as e:
        assert "0.png" in str(e)
        return
    expected = np.round(a / 257.0)
    for k, (x, _) in rows_by_key(s).items():
        assert np.abs(x[0].astype(np.int64) - expected).max() <= 1, k


def test_symlink_loop_does_not_duplicate_images(tmp_path):
    import os

    root = tmp_path / "d"
    rng = np.random.default_rng(30)
    for i in range(4):
        save(root / f"{i}.png", rand_img(rng, 4, 4))
    try:
        os.symlink(root, root / "again", target_is_directory=True)
    except (OSError, NotImplementedError):
        pytest.skip("no symlinks here")
    try:
        s = load_images(dcfg(path=root))
    except DataError:
        return
    ks = all_keys(s)
    assert len({os.path.realpath(root / k) for k in ks}) == len(ks)


def test_oversized_image_is_a_data_error_naming_it(tmp_path, monkeypatch):
    rng = np.random.default_rng(31)
    root = tmp_path / "d"
    for i in range(3):
        save(root / f"ok{i}.png", rand_img(rng, 8, 8))
    save(root / "huge.png", rand_img(rng, 16, 16))
    # stands in for a > 179-megapixel photo: 16 x 16 = 256 > 2 x 100 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DataError, match=r"huge\.png"):
        load_images(dcfg(path=root, image_size=8))
