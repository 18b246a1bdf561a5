"""Nothing lost, nothing silently wrong: `export --force` replaces only a provable earlier export, `export`
refuses a source changed since training (naming the first changed key) and never writes inside it, and
`train` refuses malformed input where it enters. Each refusal: exit 2, one line naming the file or key, no
traceback, no partial output, no user file touched."""

from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from gancleanse.cli import main
from gancleanse.integrity import seal_of, sealed, sha256_file

CONFIG = """
[data]
name = "{name}"
path = "{path}"
n_valid = 4
n_test = 4
{data}
[model]
g_hidden = 6
d_hidden = 6
z_dim = 2
activation = "softplus"
{model}
[train]
epochs = 1
batch_size = 8
[metric]
n_samples = 4
"""
N_IMAGES = 24


# ---------------------------------------------------------------------------- helpers
def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (6, 6), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_folder(root: Path) -> Path:
    for i in range(N_IMAGES):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (root / f"c{i % 2}" / f"img{i:02d}.png").write_bytes(png(i))
    (root / "c0" / "link.png").symlink_to("img00.png")  # a relative symlink: --link must copy it
    return root


def write_zip(path: Path, members: dict[str, bytes] | None = None) -> Path:
    members = members or {f"{i // 10:05d}/img{i:08d}.png": png(100 + i) for i in range(N_IMAGES)}
    labels = [[k, i % 3] for i, k in enumerate(members) if k.endswith(".png")]
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
        z.writestr("dataset.json", json.dumps({"labels": labels}))
    return path


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    rng = np.random.default_rng(7)
    np.savez(path, **({"x": rng.integers(0, 256, (N_IMAGES, 6, 6), dtype=np.uint8), "y": np.arange(N_IMAGES) % 3,
                       "note": np.array("kept")} | arrays))
    return path


def config(tmp: Path, path: Path, name: str = "images", data: str = "", model: str = "") -> Path:
    cfg = tmp / f"{path.name}.toml"
    cfg.write_text(CONFIG.format(name=name, path=path, data=data, model=model))
    return cfg


def train_and_score(tmp: Path, cfg: Path) -> tuple[Path, Path]:
    run, scores = tmp / f"{cfg.stem}.run", tmp / f"{cfg.stem}.csv"
    assert main(["train", str(cfg), "--out", str(run), "-q"]) == 0
    assert main(["influence", "--method", "random", "--check", "0", str(run), "--metric", "loss_d",
                 "--out", str(scores), "-q"]) == 0
    return run, scores


def snapshot(path: Path) -> dict[str, bytes | str]:
    """Every entry under ``path`` (or the file itself): bytes, or a symlink's target; {} when absent."""
    if path.is_file() and not path.is_symlink():
        return {".": path.read_bytes()}
    out: dict[str, bytes | str] = {}
    for p in sorted(path.rglob("*")) if path.is_dir() else []:
        rel = p.relative_to(path).as_posix()
        out[rel] = (f"-> {os.readlink(p)}" if p.is_symlink() else "dir" if p.is_dir()
                    else p.read_bytes() if p.is_file() else "special")  # a FIFO is never read
    return out


def assert_refused(code: int, err: str, *names: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gancleanse: error:"), err
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, tuple[Path, Path, Path]]:
    """{kind: (source, run, scores)}: a folder, a zip and an .npz (images loader), an .npz (npz loader)."""
    d = tmp_path_factory.mktemp("sources")
    sources = {"folder": (write_folder(d / "folder"), "images"), "zip": (write_zip(d / "pics.zip"), "images"),
               "npz": (write_npz(d / "pics.npz"), "images"), "npz-loader": (write_npz(d / "arrays.npz"), "npz")}
    return {kind: (path, *train_and_score(d, config(d, path, name))) for kind, (path, name) in sources.items()}


def export(scores: Path, out: Path, *extra: str) -> int:
    return main(["export", str(scores), "--count", "2", "--out", str(out), *extra])


# ------------------------------------------------------------ (a) --force replaces only an export
@pytest.fixture(scope="module")
def earlier(made, tmp_path_factory) -> Path:
    """A real export of the folder run."""
    out = tmp_path_factory.mktemp("earlier") / "export"
    assert export(made["folder"][2], out) == 0
    return out


def user_dir(files: dict[str, str]) -> Callable[[Path, Path], None]:
    def make(target: Path, earlier: Path) -> None:
        for name, text in files.items():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_text(text)
    return make


def copy_of_export(then: Callable[[Path], None]) -> Callable[[Path, Path], None]:
    def make(target: Path, earlier: Path) -> None:
        shutil.rmtree(target)
        shutil.copytree(earlier, target, symlinks=True)
        then(target)
    return make


def edit_export_json(fn: Callable[[dict], None], reseal: bool = False) -> Callable[[Path], None]:
    def apply(target: Path) -> None:
        meta = json.loads((target / "export.json").read_text())
        fn(meta)
        (target / "export.json").write_text(json.dumps(sealed(meta) if reseal else meta))
    return apply


def with_real_export_json(target: Path, earlier: Path) -> None:
    (target / "photo.png").write_bytes(png(1))
    shutil.copy(earlier / "export.json", target / "export.json")


def export_json_symlink(target: Path, earlier: Path) -> None:
    copy_of_export(lambda t: None)(target, earlier)
    (target / "export.json").unlink()
    (target / "export.json").symlink_to(earlier / "export.json")


FORCE_CASES: dict[str, Callable[[Path, Path], None]] = {
    "unrelated export.json": user_dir({"export.json": '{"format": "folder"}', "thesis.tex": "mine"}),
    "export.json not json": user_dir({"export.json": "{", "notes.txt": "mine"}),
    "export.json a list": user_dir({"export.json": "[]", "notes.txt": "mine"}),
    "a real export.json among user files": with_real_export_json,
    "export.json symlinked to a real one": export_json_symlink,
    "export plus a user file": copy_of_export(lambda t: (t / "notes.txt").write_text("mine")),
    "export plus a user folder": copy_of_export(lambda t: (t / "mine" / "a").mkdir(parents=True)),
    "export plus a symlink": copy_of_export(lambda t: (t / "data").symlink_to("/")),
    "export.json edited, seal kept": copy_of_export(edit_export_json(lambda m: m.update(n_removed=0))),
    "export.json files list shortened": copy_of_export(edit_export_json(lambda m: m["files"].pop(0))),
    "export.json files list shortened, resealed": copy_of_export(edit_export_json(lambda m: m["files"].pop(0),
                                                                                  reseal=True)),
    "export.json without seal": copy_of_export(edit_export_json(lambda m: m.pop("seal"))),
}


@pytest.mark.parametrize("case", sorted(FORCE_CASES))
def test_force_replaces_only_a_provable_export(case, made, earlier, tmp_path, capsys):
    target = tmp_path / "dir"
    target.mkdir()
    FORCE_CASES[case](target, earlier)
    before = snapshot(target)
    capsys.readouterr()
    assert_refused(export(made["folder"][2], target, "--force"), capsys.readouterr().err, str(target))
    assert snapshot(target) == before
    assert not (tmp_path / "dir.partial").exists()


def test_force_replaces_an_earlier_export_whose_seal_lists_every_file(made, earlier, tmp_path):
    meta = json.loads((earlier / "export.json").read_text())
    assert seal_of(meta) == meta["seal"]
    assert set(meta["files"]) == {k for k, v in snapshot(earlier).items() if v != "dir"} - {"export.json"}
    target = tmp_path / "again"
    shutil.copytree(earlier, target)
    assert main(["export", str(made["folder"][2]), "--count", "3", "--out", str(target), "--force"]) == 0
    assert json.loads((target / "export.json").read_text())["n_removed"] == 3


# --------------------------------------------------- (b) the source is what the run was trained on
def replace_file(key: str, data: bytes) -> Callable[[Path], None]:
    return lambda src: (src / key).write_bytes(data)


def swap(a: str, b: str) -> Callable[[Path], None]:
    def apply(src: Path) -> None:
        x, y = (src / a).read_bytes(), (src / b).read_bytes()
        (src / a).write_bytes(y)
        (src / b).write_bytes(x)
    return apply


def rezip(fn: Callable[[dict[str, bytes]], dict[str, bytes]]) -> Callable[[Path], None]:
    def apply(src: Path) -> None:
        with zipfile.ZipFile(src) as z:
            members = {n: z.read(n) for n in z.namelist()}
        with zipfile.ZipFile(src, "w") as z:
            for name, data in fn(members).items():
                z.writestr(name, data)
    return apply


def edit_npz(fn: Callable[[dict[str, np.ndarray]], None]) -> Callable[[Path], None]:
    def apply(src: Path) -> None:
        with np.load(src) as f:
            arrays = {k: f[k].copy() for k in f.files}
        fn(arrays)
        np.savez(src, **arrays)
    return apply


def set_row(name: str, row: int) -> Callable[[dict[str, np.ndarray]], None]:
    def fn(arrays: dict[str, np.ndarray]) -> None:
        arrays[name][row] = arrays[name][row] + 1
    return fn


ZIP_MEMBER = "00001/img00000012.png"
SOURCE_CASES: dict[str, tuple[str, Callable[[Path], None], str]] = {  # kind, change, what the line names
    "folder: an image's bytes replaced": ("folder", replace_file("c1/img05.png", png(99)), "c1/img05.png"),
    "folder: two images swapped": ("folder", swap("c1/img07.png", "c0/img10.png"), "c0/img10.png"),
    "folder: an image removed": ("folder", lambda s: (s / "c0/img04.png").unlink(), "c0/img04.png"),
    "folder: an image added": ("folder", replace_file("c0/new.png", png(98)), "c0/new.png"),
    "folder: a symlink retargeted": ("folder", lambda s: ((s / "c0/link.png").unlink(),
                                                          (s / "c0/link.png").symlink_to("img02.png")),
                                     "c0/link.png"),
    "folder: an image now a fifo": ("folder", lambda s: ((s / "c1/img03.png").unlink(), os.mkfifo(s / "c1/img03.png")),
                                    "c1/img03.png cannot be read now"),
    "zip: a member replaced": ("zip", rezip(lambda m: {**m, ZIP_MEMBER: png(97)}), f"pics.zip:{ZIP_MEMBER}"),
    "zip: dataset.json changed": ("zip", rezip(lambda m: {**m, "dataset.json": b'{"labels": null}'}),
                                  "pics.zip:dataset.json"),
    "zip: a member removed": ("zip", rezip(lambda m: {k: v for k, v in m.items() if k != ZIP_MEMBER}), ZIP_MEMBER),
    "npz: a row changed": ("npz", edit_npz(set_row("x", 5)), "pics.npz row #5"),
    "npz: a label changed": ("npz", edit_npz(set_row("y", 17)), "pics.npz row #17"),
    "npz: a row appended": ("npz", edit_npz(lambda a: a.update(x=np.concatenate([a["x"], a["x"][:1]]),
                                                              y=np.concatenate([a["y"], a["y"][:1]]))),
                            f"pics.npz row #{N_IMAGES} was added"),
    "npz: another array changed": ("npz", edit_npz(lambda a: a.update(note=np.array("other"))),
                                   "pics.npz changed since"),
    "npz loader: a row changed": ("npz-loader", edit_npz(set_row("x", 11)), "arrays.npz row #11"),
}


@pytest.fixture
def restored(made):
    """The sources back as they were after each case (they are recorded by absolute path)."""
    backups = {}
    for kind, (src, _, _) in made.items():
        backups[kind] = src.with_name(src.name + ".backup")
        (shutil.copytree(src, backups[kind], symlinks=True) if src.is_dir() else shutil.copy(src, backups[kind]))
    yield made
    for kind, (src, _, _) in made.items():
        shutil.rmtree(src) if src.is_dir() else src.unlink()
        shutil.move(backups[kind], src)


@pytest.mark.parametrize("case", sorted(SOURCE_CASES))
def test_export_refuses_a_source_changed_since_training(case, restored, tmp_path, capsys):
    kind, change, names = SOURCE_CASES[case]
    src, run, scores = restored[kind]
    change(src)
    before = snapshot(src)
    capsys.readouterr()
    out = tmp_path / "out"
    assert_refused(export(scores, out, "--all-splits"), capsys.readouterr().err, names, str(run))
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    assert snapshot(src) == before


OUT_CASES: dict[str, tuple[str, Callable[[Path], Path], str]] = {
    "inside the folder": ("folder", lambda src: src / "clean", "lies inside"),
    "deep inside the folder": ("folder", lambda src: src / "c0" / "clean", "lies inside"),
    "the folder itself": ("folder", lambda src: src, "is the data"),
    "the folder's parent": ("folder", lambda src: src.parent, "contains"),
    "the zip's folder": ("zip", lambda src: src.parent, "contains"),
    "the npz itself": ("npz", lambda src: src, "is the data"),
}


@pytest.mark.parametrize("case", sorted(OUT_CASES))
def test_export_never_writes_inside_its_source(case, made, capsys):
    kind, where, how = OUT_CASES[case]
    src, _, scores = made[kind]
    out = where(src)
    before = snapshot(src.parent)
    capsys.readouterr()
    assert_refused(export(scores, out, "--force"), capsys.readouterr().err, str(out), str(src), how)
    assert snapshot(src.parent) == before


def test_an_unchanged_source_exports_and_link_copies_symlinks(made, tmp_path, capsys):
    src, _, scores = made["folder"]
    os.utime(src / "c0" / "img00.png", (0, 0))  # times are not content
    out = tmp_path / "linked"
    capsys.readouterr()
    assert main(["export", str(scores), "--count", "0", "--all-splits", "--link", "--out", str(out)]) == 0
    assert "1 symlinked file(s) copied, not hard-linked" in capsys.readouterr().out
    copied = out / "folder" / "c0" / "link.png"
    assert not copied.is_symlink() and copied.read_bytes() == (src / "c0" / "img00.png").read_bytes()
    assert copied.stat().st_ino != (src / "c0" / "img00.png").stat().st_ino
    assert (out / "folder" / "c0" / "img02.png").stat().st_ino == (src / "c0" / "img02.png").stat().st_ino
    assert json.loads((out / "export.json").read_text())["symlinks_copied"] == 1


def without_key_hashes(run: Path, tmp_path: Path) -> Path:
    """A copy of ``run`` as recorded before per-key hashes: splits.json's source has the aggregate digest alone."""
    old = tmp_path / "old-run"
    shutil.copytree(run, old)
    splits = json.loads((old / "splits.json").read_text())
    for key in ("sha256", "rows", "file_sha256"):
        splits["source"].pop(key, None)
    (old / "splits.json").write_text(json.dumps(splits))
    meta = json.loads((old / "run.json").read_text())
    meta["files"]["splits.json"] = sha256_file(old / "splits.json")
    (old / "run.json").write_text(json.dumps(sealed(meta)))
    return old


@pytest.mark.parametrize("kind", ["folder", "npz"])
def test_a_run_recorded_before_key_hashes_checks_the_aggregate_digest(kind, restored, tmp_path, capsys):
    src, run, _ = restored[kind]
    old = without_key_hashes(run, tmp_path)
    scores = tmp_path / "old.csv"
    assert main(["influence", "--method", "random", "--check", "0", str(old), "--metric", "loss_d",
                 "--out", str(scores), "-q"]) == 0
    assert main(["export", str(scores), "--count", "1", "--out", str(tmp_path / "ok")]) == 0
    (SOURCE_CASES["folder: an image's bytes replaced"][1] if kind == "folder"
     else SOURCE_CASES["npz: a row changed"][1])(src)
    capsys.readouterr()
    code = main(["export", str(scores), "--count", "1", "--out", str(tmp_path / "no")])
    assert_refused(code, capsys.readouterr().err, f"the data at {src} changed since {old} was trained")
    assert not (tmp_path / "no").exists()


# ------------------------------------------------------------- (c) input validated at train
def zip_with_duplicate(d: Path) -> Path:
    path = write_zip(d / "dup.zip")
    with zipfile.ZipFile(path, "a") as z, pytest.warns(UserWarning, match="Duplicate name"):
        z.writestr("00000/img00000003.png", png(55))
    return path


def zip_with_non_utf8_name(d: Path) -> Path:
    path = write_zip(d / "names.zip", {"badé.png": png(1), **{f"img{i}.png": png(i) for i in range(N_IMAGES)}})
    path.write_bytes(path.read_bytes().replace("badé".encode(), b"bad\xff\xa9"))  # flagged UTF-8, and is not
    return path


def folder_with(extra: Callable[[Path], None]) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        root = d / "data"
        for i in range(N_IMAGES):
            (root / f"img{i:02d}.png").parent.mkdir(parents=True, exist_ok=True)
            (root / f"img{i:02d}.png").write_bytes(png(i))
        extra(root)
        return root
    return make


def dataset_json(text: str) -> Callable[[Path], Path]:
    return folder_with(lambda root: (root / "dataset.json").write_text(text))


def labels_json(entries: list) -> Callable[[Path], Path]:
    return dataset_json(json.dumps({"labels": entries}))


def non_utf8_name(root: Path) -> None:
    with open(os.fsencode(root) + b"/bad\xff.png", "wb") as f:
        f.write(png(1))


def npy_object(d: Path) -> Path:
    with open(d / "obj.npy", "wb") as f:
        np.lib.format.write_array(f, np.array([{"a": 1}] * N_IMAGES, dtype=object), allow_pickle=True)
    return d / "obj.npy"


def npz_with_object(d: Path, name: str = "pics.npz") -> Path:
    rng = np.random.default_rng(1)
    np.savez(d / name, x=rng.integers(0, 256, (N_IMAGES, 6, 6), dtype=np.uint8),
             meta=np.array([None] * N_IMAGES, dtype=object))
    return d / name


def _add_member(path: Path) -> Path:
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("notes.txt", b"written by hand")
    return path


def npz_labels(y: np.ndarray) -> Callable[[Path], Path]:
    return lambda d: write_npz(d / "labelled.npz", y=y)


LABEL_2_70 = np.full(N_IMAGES, 2.0 ** 70)
LABEL_2_50 = np.arange(N_IMAGES, dtype=np.int64) % 3
LABEL_2_50[9] = 2 ** 50
BIG_CLASS = np.arange(N_IMAGES, dtype=np.int64) % 3
BIG_CLASS[9] = 70_000
TRAIN_CASES: dict[str, tuple[Callable[[Path], Path], str, str, str, list[str]]] = {
    # make the data, config [data] extra, [model] extra, loader name, what the line names
    "zip duplicate member": (zip_with_duplicate, "", "", "images", ["dup.zip", "00000/img00000003.png", "twice"]),
    "dataset.json not json": (dataset_json("{labels"), 'labels = "none"', "", "images",
                              ["dataset.json", "not valid JSON"]),
    "dataset.json not utf-8": (folder_with(lambda r: (r / "dataset.json").write_bytes(b'{"labels": "\xff"}')),
                               "", "", "images", ["dataset.json", "not valid JSON"]),
    "dataset.json a list": (dataset_json("[1, 2]"), 'labels = "none"', "", "images", ["dataset.json", "list"]),
    "dataset.json labels a dict": (dataset_json('{"labels": {"a.png": 1}}'), "", "", "images",
                                   ["dataset.json", "'labels'"]),
    "dataset.json entry not a pair": (labels_json([["img00.png", 1, 2]]), 'labels = "none"', "", "images",
                                      ["dataset.json", "labels[0]"]),
    "dataset.json label a string": (labels_json([["img00.png", 0], ["img01.png", "1"]]), "", "", "images",
                                    ["dataset.json", "labels[1]"]),
    "dataset.json label negative": (labels_json([["img00.png", -1]]), "", "", "images",
                                    ["dataset.json", "labels[0]", "-1"]),
    "dataset.json label 2**70": (labels_json([["img00.png", 2 ** 70]]), "", "", "images",
                                 ["dataset.json", "labels[0]", str(2 ** 70)]),
    "dataset.json label twice": (labels_json([["img00.png", 1], ["img00.png", 2]]), "", "", "images",
                                 ["dataset.json", "labels[1]", "img00.png"]),
    "file name not utf-8": (folder_with(non_utf8_name), "", "", "images", ["bad\\udcff.png", "UTF-8"]),
    "zip member name not utf-8": (zip_with_non_utf8_name, "", "", "images", ["names.zip", "bad\\xff\\xa9", "UTF-8"]),
    "fifo named like an image": (folder_with(lambda r: os.mkfifo(r / "pipe.png")), "", "", "images",
                                 ["pipe.png", "not a regular file"]),
    "dangling symlink": (folder_with(lambda r: (r / "gone.png").symlink_to("nowhere.png")), "", "", "images",
                         ["gone.png"]),
    "npy object array": (npy_object, "", "", "images", ["obj.npy", "Object arrays"]),
    "npz object array": (npz_with_object, "", "", "images", ["pics.npz", "'meta'", "Python objects"]),
    "npz loader object array": (npz_with_object, "", "", "npz", ["pics.npz", "'meta'", "Python objects"]),
    "npz member not an array": (lambda d: _add_member(write_npz(d / "pics.npz")), "", "", "images",
                                ["pics.npz", "'notes.txt'", "not a NumPy array"]),
    "npz label 2**70": (npz_labels(LABEL_2_70), "", "", "images", ["labelled.npz:y", str(2 ** 70)]),
    "npz label 2**50 conditional": (npz_labels(LABEL_2_50), "", "conditional = true", "images",
                                    ["labelled.npz:y", str(2 ** 50), "row 9"]),
    "npz loader label 2**50": (npz_labels(LABEL_2_50), "", "conditional = true", "npz",
                               ["labelled.npz:y", str(2 ** 50)]),
    "conditional with 70000 classes": (npz_labels(BIG_CLASS), "", "conditional = true", "images",
                                       ["70000", "65536 classes"]),
}


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_train_refuses_malformed_input_where_it_enters(case, tmp_path, capsys):
    make, data, model, name, names = TRAIN_CASES[case]
    (tmp_path / "in").mkdir()
    path = make(tmp_path / "in")
    cfg = config(tmp_path, path, name, data, model)
    before = snapshot(tmp_path / "in")
    capsys.readouterr()
    code = main(["train", str(cfg), "--out", str(tmp_path / "run"), "-q"])
    assert_refused(code, capsys.readouterr().err, *names)
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()
    assert snapshot(tmp_path / "in") == before


def test_skip_bad_files_skips_a_dangling_symlink_and_reports_it(tmp_path, capsys):
    root = folder_with(lambda r: (r / "gone.png").symlink_to("nowhere.png"))(tmp_path)
    cfg = config(tmp_path, root, data="skip_bad_files = true")
    assert main(["train", str(cfg), "--out", str(tmp_path / "run"), "-q"]) == 0
    assert "gone.png" in capsys.readouterr().err
    skipped = json.loads((tmp_path / "run" / "splits.json").read_text())["source"]["skipped"]
    assert [key for key, _ in skipped] == ["gone.png"]
    assert main(["verify", str(tmp_path / "run"), "--no-replay", "-q"]) == 0
