"""Bad user input in a config or a data header: one line naming the file and key, exit 2, no run directory.

Each case goes through the real command line in-process (``gancleanse train CFG --out OUT``),
so that a loader's traceback or a half-made run directory fails the test as a user would see it.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from gancleanse.cli import main
from gancleanse.config import load_config
from gancleanse.device import check_threads
from gancleanse.toml_writer import dump_toml
from gancleanse.errors import ConfigError

# conftest.tiny_config's run, as TOML
BASE: dict[str, dict[str, Any]] = {
    "data": {"n_train": 60, "n_valid": 50, "n_test": 50, "seed": 3},
    "model": {"activation": "softplus", "g_hidden": 8, "d_hidden": 8, "z_dim": 3},
    "train": {"epochs": 2, "batch_size": 10, "lr_d": 0.05, "lr_g": 0.05, "record_from_epoch": 0,
              "checkpoint_every": 4, "seed": 1},
    "metric": {"n_samples": 40},
}
IMAGE = 4  # side of the synthetic MNIST images
N_TRAIN_IMAGES, N_TEST_IMAGES = 120, 60


def toml(**sections: dict[str, Any]) -> str:
    raw = {name: dict(values) for name, values in BASE.items()}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return dump_toml(raw)


def idx(magic: int, dims: list[int], body: bytes) -> bytes:
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims) + body


def good_idx() -> dict[str, bytes]:
    px = IMAGE * IMAGE
    return {"train-images-idx3-ubyte": idx(2051, [N_TRAIN_IMAGES, IMAGE, IMAGE], bytes(N_TRAIN_IMAGES * px)),
            "train-labels-idx1-ubyte": idx(2049, [N_TRAIN_IMAGES], bytes(N_TRAIN_IMAGES)),
            "t10k-images-idx3-ubyte": idx(2051, [N_TEST_IMAGES, IMAGE, IMAGE], bytes(N_TEST_IMAGES * px)),
            "t10k-labels-idx1-ubyte": idx(2049, [N_TEST_IMAGES], bytes(N_TEST_IMAGES))}


# A setup writes the config (and any data) under tmp and returns (config path, what the error must name).
Setup = Callable[[Path], tuple[Path, str]]


def config(text: str | bytes, names: str) -> Setup:
    def setup(tmp: Path) -> tuple[Path, str]:
        p = tmp / "cfg.toml"
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        return p, names
    return setup


def a_directory(tmp: Path) -> tuple[Path, str]:
    d = tmp / "configs.toml"
    d.mkdir()
    return d, str(d)


def mnist_with(file: str, content: Callable[[], bytes]) -> Setup:
    """An MNIST IDX directory whose ``file`` is broken; the error must name that file."""
    def setup(tmp: Path) -> tuple[Path, str]:
        d = tmp / "mnist"
        d.mkdir()
        for name, data in {**good_idx(), file: content()}.items():
            (d / name).write_bytes(data)
        return config(toml(data={"name": "mnist", "path": str(d)}), str(d / file))(tmp)
    return setup


def npz_with(build: Callable[[Path], None]) -> Setup:
    def setup(tmp: Path) -> tuple[Path, str]:
        p = tmp / "images.npz"
        build(p)
        return config(toml(data={"name": "npz", "path": str(p)}), str(p))(tmp)
    return setup


def raw_member(path: Path) -> None:
    """A zip whose member x holds bytes without an .npy header (numpy returns them as bytes)."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", b"not an array")


def corrupt_deflate(path: Path) -> None:
    """A compressed .npz whose deflate stream is garbage (zlib.error, not BadZipFile)."""
    np.savez_compressed(path, x=np.zeros((200, IMAGE, IMAGE), np.uint8))
    raw = bytearray(path.read_bytes())
    off = zipfile.ZipFile(path).getinfo("x.npy").header_offset
    name_len, extra_len = (int.from_bytes(raw[off + i:off + i + 2], "little") for i in (26, 28))
    start = off + 30 + name_len + extra_len  # the local header, then the member's data
    raw[start:start + 8] = b"\xff" * 8  # deflate block type 3 is reserved
    path.write_bytes(bytes(raw))


BIG = 2**63
CASES: list[tuple[str, Setup, str]] = [
    # integers TOML allows but no 64-bit integer holds
    ("epochs_2**63", config(toml(train={"epochs": BIG}), "train.epochs"), "does not fit a 64-bit integer"),
    ("data_seed_2**63", config(toml(data={"seed": BIG}), "data.seed"), "does not fit a 64-bit integer"),
    ("z_dim_2**63", config(toml(model={"z_dim": BIG}), "model.z_dim"), "does not fit a 64-bit integer"),
    ("n_samples_2**63", config(toml(metric={"n_samples": BIG}), "metric.n_samples"), "does not fit"),
    ("checkpoint_every_2**70", config(toml(train={"checkpoint_every": 2**70}), "train.checkpoint_every"),
     "does not fit a 64-bit integer"),
    ("metric_seed_2**70", config(toml(metric={"seed": 2**70}), "metric.seed"), "does not fit"),
    ("lr_d_int_10**400", config(toml(train={"lr_d": 10**400}), "train.lr_d"), "an integer of 401 digits"),
    ("cleanse_seed_2**63", config(toml(cleanse={"seeds": [0, BIG]}), "cleanse.seeds[1]"), "does not fit"),
    # the file itself
    ("invalid_utf8", config(b"[train]\nepochs = 2 # caf\xe9\n", "cfg.toml"), "not UTF-8 text (byte 0xe9 at offset 24)"),
    ("directory", a_directory, "is a directory"),
    ("nested_too_deeply", config("a = " + "[" * 5000 + "]" * 5000 + "\n", "cfg.toml"), "nested too deeply"),
    # [cleanse] lists
    ("seeds_empty", config(toml(cleanse={"seeds": []}), "cleanse.seeds"), "cleanse.seeds is empty"),
    ("seeds_repeated", config(toml(cleanse={"seeds": [0, 0]}), "cleanse.seeds"), "lists seed 0 more than once"),
    ("seed_negative", config(toml(cleanse={"seeds": [1, -1]}), "cleanse.seeds[1]"), "= -1 is out of range"),
    ("seed_2**32", config(toml(cleanse={"seeds": [2**32]}), "cleanse.seeds[0]"), "must be < 4294967296"),
    ("rates_empty", config(toml(cleanse={"removal_rates": []}), "cleanse.removal_rates"), "is empty"),
    ("rates_repeated", config(toml(cleanse={"removal_rates": [0.0, 0.1, 0.1]}), "cleanse.removal_rates"),
     "lists removal rate 0.1 more than once"),
    ("rate_1", config(toml(cleanse={"removal_rates": [0.0, 1.0]}), "cleanse.removal_rates[1]"), "must be < 1"),
    ("methods_empty", config(toml(cleanse={"methods": []}), "cleanse.methods"), "cleanse.methods is empty"),
    ("methods_repeated", config(toml(cleanse={"methods": ["itd", "itd"]}), "cleanse.methods"),
     "lists method 'itd' more than once"),
    ("method_unknown", config(toml(cleanse={"methods": ["itd", "tracin"]}), "cleanse.methods"),
     "unknown method 'tracin'"),
    ("metrics_empty", config(toml(cleanse={"metrics": []}), "cleanse.metrics"), "cleanse.metrics is empty"),
    ("metrics_repeated", config(toml(cleanse={"metrics": ["fid", "fid"]}), "cleanse.metrics"),
     "lists metric 'fid' more than once"),
    # ranges
    ("ema_beta_1", config(toml(train={"ema_beta": 1.0}), "train.ema_beta"), "must be < 1"),
    ("threads_100000", config(toml(train={"threads": 100000}), "train.threads"), "must be <= 1024"),
    ("threads_0", config(toml(train={"threads": 0}), "train.threads"), "must be >= 1"),
    ("image_size_100000", config(toml(data={"image_size": 100000}), "data.image_size"), "out of range"),
    # data headers
    ("idx_product_overflows", mnist_with("train-images-idx3-ubyte", lambda: idx(2051, [2**31, 2**31, 4], b"")),
     "header declares shape (2147483648, 2147483648, 4)"),
    ("idx_truncated_body", mnist_with("t10k-images-idx3-ubyte", lambda: good_idx()["t10k-images-idx3-ubyte"][:-5]),
     "truncated"),
    ("idx_truncated_header", mnist_with("train-labels-idx1-ubyte", lambda: idx(2049, [], b"")),
     "truncated IDX file"),
    ("idx_bad_magic", mnist_with("train-images-idx3-ubyte", lambda: idx(2049, [1], b"\x00")),
     "wrong magic number 2049"),
    ("idx_test_shape_differs", mnist_with("t10k-images-idx3-ubyte",
                                          lambda: idx(2051, [N_TEST_IMAGES, 3, 3], bytes(N_TEST_IMAGES * 9))),
     "must have the same shape"),
    ("npz_member_not_array", npz_with(raw_member), "member 'x' is not a NumPy array"),
    ("npz_corrupt_deflate", npz_with(corrupt_deflate), "not a readable .npz file"),
]


@pytest.fixture(autouse=True)
def nothing_past_the_data(monkeypatch):
    """Input the checks miss must fail this test fast, not crash or exhaust the machine.

    Every case is caught while reading the config or the data, so building the models
    means a check is missing; a huge thread count is stopped before torch sees it.
    """
    original = torch.set_num_threads

    def guarded(n: int) -> None:
        assert n <= 1024, f"training asked torch for {n} threads"
        original(n)

    def no_models(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the bad input got past config and data loading")

    monkeypatch.setattr(torch, "set_num_threads", guarded)
    monkeypatch.setattr("gancleanse.training.recorder.build_models", no_models)


@pytest.mark.parametrize("setup,needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_naming_it(tmp_path, capsys, setup, needle):
    cfg, names = setup(tmp_path)
    out = tmp_path / "run"
    code = main(["train", str(cfg), "--out", str(out), "-q"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gancleanse: error:"), err
    assert "Traceback" not in err
    assert needle in err
    assert names in err
    if names.startswith(("train.", "data.", "model.", "metric.", "cleanse.")):
        assert str(cfg) in err  # a key is named together with its file
    assert not out.exists() and not out.with_name("run.partial").exists()


def test_the_intact_files_load(tmp_path):
    """The control of the data cases: only the file each case breaks is at fault."""
    from gancleanse.data import load_data

    d = tmp_path / "mnist"
    d.mkdir()
    for name, data in good_idx().items():
        (d / name).write_bytes(data)
    np.savez(tmp_path / "images.npz", x=np.zeros((200, IMAGE, IMAGE), np.uint8))
    for data in ({"name": "mnist", "path": str(d)}, {"name": "npz", "path": str(tmp_path / "images.npz")}):
        (tmp_path / "cfg.toml").write_text(toml(data=data))
        splits = load_data(load_config(tmp_path / "cfg.toml"))
        assert tuple(splits.train.shape) == (60, 1, IMAGE, IMAGE)


def test_limits_still_accept_the_largest_valid_values(tmp_path):
    """The bounds reject only what cannot work: 2**63 - 1, 2**32 - 1 and 1024 threads load."""
    p = tmp_path / "cfg.toml"
    p.write_text(toml(data={"seed": 2**63 - 1}, train={"threads": 1024, "ema_beta": 0.999},
                      cleanse={"seeds": [0, 2**32 - 1], "removal_rates": [0.0, 0.99]}))
    cfg = load_config(p)
    assert cfg.data.seed == 2**63 - 1 and cfg.train.threads == 1024  # more threads than cores: still loads
    assert cfg.cleanse.seeds == [0, 2**32 - 1]
    torch.Generator().manual_seed(2**63 - 1 + 2**32 - 1)  # a replicate's data seed: torch accepts it
    np.random.SeedSequence([2**63 - 1 + 2**32 - 1, 0, 0]).generate_state(1)


def test_check_threads_counts_the_cores_this_process_may_use(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the machine: not what the process may use
    check_threads(1)
    check_threads(2)
    with pytest.raises(ConfigError, match=r"train\.threads = 3 exceeds the 2 CPU cores available"):
        check_threads(3)
    with pytest.raises(ConfigError, match=r"^--threads = 0 is out of range"):
        check_threads(0, key="--threads")


def test_check_threads_falls_back_to_cpu_count(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # macOS, Windows
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    check_threads(4)
    with pytest.raises(ConfigError, match=r"train\.threads = 5 exceeds the 4 CPU cores"):
        check_threads(5)
