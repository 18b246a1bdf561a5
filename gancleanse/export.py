"""The cleaned dataset: the training split minus its most harmful instances, in its own format.

``export(scores, out, rate=... | count=...)`` writes into ``out``:

- the kept images in the format they came from: ``out/NAME/`` with the same relative paths (files copied byte
  for byte, or hard-linked), ``out/NAME.zip`` (members copied with their compression, ``dataset.json``
  filtered), or ``out/NAME.npy`` / ``NAME.npz`` (rows filtered, arrays otherwise unchanged). Data that came
  from no file (2D points, the bundled digits, tensors given to the API) is written as ``out/train.npz``;
- ``removed.csv`` (``rank,key,index,harmfulness,influence``, most harmful first) and ``removed.png``, the
  removed images as the model saw them, labelled with rank and key;
- ``export.json``: what was exported from which scores and run, by which rule, and every file the export wrote,
  sealed (the sha256 of its own content): ``force`` replaces ``out`` only when that seal verifies and ``out`` holds
  nothing but those files, never because a file named export.json is in it.

The validation and test splits are exported too with ``all_splits`` when they came from the same source (not
from a separate ``reference_path``). Before writing anything the source is checked against what the run was
trained on (``data.source_check``), and ``out`` may not lie inside it (nor be it, nor contain it). Nothing is
written unless the whole export succeeds.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Sequence

import numpy as np

from .errors import GancleanseError, RunDirError
from .files import STAGE_MARKER, staged_directory, write_json_atomic
from .integrity import seal_of, sealed
from .scores import Scores, harmful_first

if TYPE_CHECKING:
    from .run import Run

GRID_MAX = 64  # removed images drawn in removed.png
MARKER = "export.json"
MARKER_MAX_BYTES = 1 << 28  # an export.json read by --force: a crafted huge one is refused, not read whole


def select(harmfulness: np.ndarray, *, rate: float | None = None, count: int | None = None,
           min_harmfulness: float | None = None) -> list[int]:
    """The instances to remove, most harmful first: the top ``floor(N * rate)`` or ``count``,
    of which only those with harmfulness >= ``min_harmfulness`` (alone: all of those)."""
    n = len(harmfulness)
    if rate is not None and count is not None:
        raise GancleanseError("give either a removal rate or a count, not both")
    if rate is None and count is None and min_harmfulness is None:
        raise GancleanseError("say how many instances to remove: --rate R, --count N or --min-harmfulness H")
    if rate is not None and not (math.isfinite(rate) and 0.0 <= rate < 1.0):
        raise GancleanseError(f"--rate must lie in [0, 1), got {rate}")
    if count is not None and not 0 <= count < n:
        raise GancleanseError(f"--count must lie in 0..{n - 1} (the training split has {n} instances), got {count}")
    if min_harmfulness is not None and not math.isfinite(min_harmfulness):
        raise GancleanseError(f"--min-harmfulness must be finite, got {min_harmfulness}")
    k = math.floor(n * rate) if rate is not None else count if count is not None else n
    top = [int(i) for i in harmful_first(harmfulness)[:k]]
    return [i for i in top if min_harmfulness is None or harmfulness[i] >= min_harmfulness]


# ------------------------------------------------------------------------- the run side
def _open_run(table: Scores, run: str | Path | None) -> "Run":
    """The run the scores were computed on, for its verified config and recorded keys (no models are built)."""
    from .run import Run

    if run is None and not table.info.get("run"):
        raise GancleanseError(f"{table.path}: no SCORES.json beside it names the run; pass --run RUN_DIR")
    return Run.open(Path(run if run is not None else table.info["run"]), device="cpu")  # reads data only


def _source_path(scored_run: "Run", src: dict[str, Any] | None) -> Path:
    return Path(src["path"]) if src else Path(scored_run.cfg.data.path).expanduser()


# --------------------------------------------------------------------------- writers
def _copy_folder(src: Path, dst: Path, keys: Sequence[str], link: bool) -> int:
    """Copy (or hard-link) the files ``keys``; returns how many symlinks were copied instead of linked (a hard
    link to a symlink would be the link itself, dangling in the export when relative)."""
    copied_links = 0
    for key in keys:
        target = dst / key
        target.parent.mkdir(parents=True, exist_ok=True)
        if link and not (src / key).is_symlink():
            try:
                os.link(src / key, target)
                continue
            except OSError as e:
                raise GancleanseError(f"cannot hard-link {src / key} into {dst} ({e}); "
                                      "export without --link to copy") from None
        if link:
            copied_links += 1
        shutil.copy2(src / key, target)  # a symlink: its target's bytes
    if (src / "dataset.json").is_file():
        raw = (src / "dataset.json").read_bytes()
        (dst / "dataset.json").write_bytes(_filtered_dataset_json(raw, keys, str(src / "dataset.json")))
    return copied_links


def _filtered_dataset_json(raw: bytes, keys: Sequence[str], where: str) -> bytes:
    from .data.image_listing import dataset_json_labels

    meta = json.loads(raw)
    if dataset_json_labels(raw, where) is not None:  # checked (train refuses a malformed one; older runs may not)
        keep = set(keys)
        meta = dict(meta, labels=[item for item in meta["labels"] if item[0] in keep])
    return (json.dumps(meta) + "\n").encode()


def _copy_zip(src: Path, dst: Path, keys: Sequence[str]) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for key in keys:
            info = zin.getinfo(key)
            zout.writestr(info, zin.read(key), compress_type=info.compress_type)
        if "dataset.json" in zin.namelist():
            zout.writestr("dataset.json", _filtered_dataset_json(zin.read("dataset.json"), keys, f"{src}:dataset.json"))


def _rows(keys: Sequence[str]) -> np.ndarray:
    try:
        return np.array([int(k.removeprefix("#")) for k in keys], dtype=np.int64)
    except ValueError:
        raise GancleanseError(f"array instance keys must be '#row', got {keys[0]!r}") from None


def _copy_arrays(src: Path, dst: Path, keys: Sequence[str], array: str | None) -> None:
    rows = _rows(keys)
    try:
        if src.suffix.lower() == ".npy":
            np.save(dst, np.load(src, allow_pickle=False)[rows])
            return
        with np.load(src, allow_pickle=False) as f:
            n = f[array or "x"].shape[0]
            arrays = {k: (f[k][rows] if f[k].ndim and f[k].shape[0] == n else f[k]) for k in f.files}
    except ValueError as e:  # an object array, in a run trained before train refused them
        raise GancleanseError(f"{src}: cannot be exported ({e})") from None
    np.savez(dst, **arrays)


# ----------------------------------------------------------------------------- pictures
def removed_picture(path: Path, images: np.ndarray | None, points: np.ndarray | None, removed: list[int],
                    keys: Sequence[str], harm: np.ndarray) -> bool:
    """removed.png: a labelled grid of removed images, or for 2D data the points circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if images is not None and images.ndim == 4:
        shown = removed[:GRID_MAX]
        cols = min(8, max(1, len(shown)))
        rows = max(1, math.ceil(len(shown) / cols))
        fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows + 0.4), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for r, (ax, i) in enumerate(zip(axes.flat, shown), 1):
            img = np.clip((images[r - 1] + 1.0) / 2.0, 0.0, 1.0).transpose(1, 2, 0)
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                      vmin=0.0, vmax=1.0, interpolation="nearest")
            label = keys[i] if len(keys[i]) <= 22 else "..." + keys[i][-19:]
            ax.set_title(f"{r}. {label}\n{harm[i]:.3g}", fontsize=6)
        more = f" (first {len(shown)} of {len(removed)})" if len(removed) > len(shown) else ""
        fig.suptitle(f"removed, most harmful first{more}: rank. key / harmfulness", fontsize=8)
    elif points is not None and points.ndim == 2 and points.shape[1] == 2:
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.scatter(points[:, 0], points[:, 1], s=3, c="0.6", label="kept")
        ax.scatter(points[removed, 0], points[removed, 1], s=14, facecolors="none", edgecolors="red",
                   label=f"removed ({len(removed)})")
        ax.legend(fontsize=8)
        ax.set_title("training instances removed by the export", fontsize=9)
    else:
        return False
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _removed_images(scored_run: "Run", src: dict[str, Any] | None, fmt: str,
                    removed: list[int]) -> np.ndarray | None:
    """The first removed instances as model values, decoded or converted the way training read them."""
    keys = [scored_run.recorded_splits["train"][i] for i in removed[:GRID_MAX]]
    if not keys:
        return None
    if fmt in ("folder", "zip"):
        from .data.image_convert import Converter
        from .data.image_listing import open_listing

        convert = Converter(scored_run.cfg.data)
        listing = open_listing(Path(src["path"]))
        try:
            raw = [convert(listing.read(key)) for key in keys]
        finally:
            listing.close()
        channels = max(a.shape[0] for a in raw)
        raw = [np.repeat(a, channels // a.shape[0], axis=0) for a in raw]
        return np.stack(raw).astype(np.float64) / 127.5 - 1.0
    if fmt in ("npy", "npz"):
        import torch

        from .data.base import as_float
        from .data.image_convert import channels_first, convert_array
        from .data.image_sources import read_array_file

        path = _source_path(scored_run, src)
        x = np.ascontiguousarray(channels_first(read_array_file(path)[0], str(path))[_rows(keys)])
        return as_float(torch.from_numpy(convert_array(x, scored_run.cfg.data, str(path)))).numpy()
    return None


# ----------------------------------------------------------------------- what may be written
def _check_belongs(table: Scores, scored_run: "Run") -> None:
    """The scores must have been computed on this training of the run."""
    train_keys = scored_run.recorded_splits["train"]
    n_scored = len(table.harmfulness)
    if len(train_keys) != n_scored or (table.keys is not None and table.keys != train_keys):
        raise GancleanseError(f"{table.path or 'the scores'} do not belong to run {scored_run.path}: "
                              f"{n_scored} scored instances, the run's training split has {len(train_keys)}"
                              + ("" if len(train_keys) != n_scored else " with other keys"))
    scored_on = table.info.get("run_id")
    if scored_on is not None and scored_on != scored_run.id:
        raise GancleanseError(f"{table.path or 'the scores'} were computed on another training than the run now at "
                              f"{scored_run.path} (SCORES.json names run {scored_on[:12]}..., "
                              f"the run is {scored_run.id[:12]}...)")


def _check_source(scored_run: "Run", src: dict[str, Any] | None, out: Path) -> None:
    """Before anything is written: ``out`` lies outside the data, and the data is what the run was trained on."""
    data = scored_run.cfg.data
    sources = ([src["path"]] + ([src["reference"]["path"]] if "reference" in src else []) if src
               else [p for p in (data.path, data.reference_path) if p])
    target = out.expanduser().resolve()
    for source in sources:
        real = Path(source).expanduser().resolve()
        how = ("is" if target == real else "lies inside" if real in target.parents
               else "contains" if target in real.parents else None)
        if how:
            raise GancleanseError(f"--out {out} {how} the data the run was trained on ({source}): export never "
                                  "writes into its source; choose an output outside it")
    if src is not None:
        from .data.source_check import verify_source

        verify_source(src, scored_run.path)
    else:  # data from no file, or a run recorded without a source: the fingerprint of the values
        scored_run.splits  # noqa: B018 - reloads the data and refuses it when changed


def _is_earlier_export(path: Path) -> bool:
    """``force`` replaces ``path`` only when it provably is an earlier export: its export.json's seal verifies
    and it holds nothing but the files that export.json lists. Otherwise an error names ``path`` and why."""
    from .integrity import read_bounded

    def refuse(why: str) -> NoReturn:
        raise RunDirError(f"{path} is not provably an earlier gancleanse export ({why}): --force replaces only "
                          "those; nothing in it was touched, choose another output path")

    try:
        meta = json.loads(read_bounded(path / MARKER, MARKER_MAX_BYTES, f"the cap on {MARKER}"))
        valid = (isinstance(meta, dict) and isinstance(meta.get("files"), list)
                 and all(isinstance(name, str) for name in meta["files"]) and meta.get("seal") == seal_of(meta))
    except (OSError, ValueError, RecursionError):
        valid = False
    if not valid:
        refuse(f"no {MARKER} with a valid seal")
    listed = set(meta["files"]) | {MARKER}
    folders = {parent.as_posix() for name in listed for parent in Path(name).parents}
    for dirpath, dirnames, filenames in os.walk(path):
        rel = Path(dirpath).relative_to(path)
        for name in dirnames:
            if (rel / name).as_posix() not in folders or os.path.islink(Path(dirpath) / name):
                refuse(f"{(rel / name).as_posix()!r} is not one of its folders")
        for name in filenames:
            if (rel / name).as_posix() not in listed or not os.path.isfile(Path(dirpath) / name) \
                    or os.path.islink(Path(dirpath) / name):
                refuse(f"{(rel / name).as_posix()!r} is not one of the files it wrote")
    return True


def _written_files(stage: Path) -> list[str]:
    """Every file written into the stage so far, as paths relative to it (the stage's own marker aside)."""
    return sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*")
                  if not p.is_dir() and p.name != STAGE_MARKER)


# ------------------------------------------------------------------------------- main
def export(scores: str | Path | Scores, out: str | Path, *, rate: float | None = None,
           count: int | None = None, min_harmfulness: float | None = None, run: str | Path | None = None,
           link: bool = False, all_splits: bool = False, force: bool = False) -> dict[str, Any]:
    """Write the cleaned training split of ``scores``' run to ``out``; returns what export.json says."""
    table = scores if isinstance(scores, Scores) else Scores.load(scores)
    scored_run = _open_run(table, run)
    _check_belongs(table, scored_run)
    recorded = scored_run.recorded_splits
    train_keys = recorded["train"]
    removed = select(table.harmfulness, rate=rate, count=count, min_harmfulness=min_harmfulness)
    gone = set(removed)
    kept_keys = [k for i, k in enumerate(train_keys) if i not in gone]
    out = Path(out)
    src = recorded.get("source")
    fmt = src["format"] if src else ("npz" if scored_run.cfg.data.name == "npz" else "tensors")
    extra: list[str] = []
    if all_splits:
        if src is not None and "reference" in src:
            raise GancleanseError("--all-splits: the validation and test splits came from data.reference_path, "
                                  "a different dataset; export the training split alone")
        extra = recorded["valid"] + recorded["test"]
    _check_source(scored_run, src, out)
    points, copied_links = None, 0  # the training points of 2D data, for removed.png
    with staged_directory(out, force=force, is_ours=_is_earlier_export, what="export") as stage:
        if fmt in ("folder", "zip", "npy", "npz"):
            source_path = _source_path(scored_run, src)
            target = stage / source_path.name
            if fmt == "folder":
                copied_links = _copy_folder(source_path, target, kept_keys + extra, link)
            elif fmt == "zip":
                _copy_zip(source_path, target, kept_keys + extra)
            else:
                _copy_arrays(source_path, target, kept_keys + extra, src.get("array") if src else "x")
        else:
            target = stage / "train.npz"
            points = _write_tensors(scored_run, target, [i for i in range(len(train_keys)) if i not in gone])
        images = _removed_images(scored_run, src, fmt, removed)
        with open(stage / "removed.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["rank", "key", "index", "harmfulness", "influence"])
            for r, i in enumerate(removed, 1):
                w.writerow([r, train_keys[i], i, repr(float(table.harmfulness[i])), repr(float(table.influence[i]))])
        drew = bool(removed) and removed_picture(stage / "removed.png", images, points, removed, train_keys,
                                                 table.harmfulness)
        info = sealed({"format": fmt, "output": target.name, "scores": str(table.path) if table.path else None,
                       "run": str(scored_run.path), "rule": {"rate": rate, "count": count,
                                                             "min_harmfulness": min_harmfulness},
                       "metric": table.info.get("metric"), "method": table.info.get("method"),
                       "n_train": len(train_keys), "n_removed": len(removed),
                       "n_exported": len(kept_keys) + len(extra), "all_splits": all_splits, "link": link,
                       "symlinks_copied": copied_links, "removed_png": drew,
                       "source": None if src is None else {k: src[k] for k in ("path", "digest") if k in src},
                       "files": _written_files(stage)})
        write_json_atomic(stage / MARKER, info)
    return {**info, "path": str(out / info["output"])}


def _write_tensors(scored_run: "Run", target: Path, kept: list[int]) -> np.ndarray:
    """train.npz of the kept instances as the model saw them; returns the whole training split."""
    splits = scored_run.splits
    x = splits.split("train").numpy()
    arrays = {"x": x[kept]}
    if splits.y_train is not None:
        arrays["y"] = splits.y_train.numpy()[kept]
    np.savez(target, **arrays)
    return x


def summary_line(info: dict[str, Any]) -> str:
    copied = info.get("symlinks_copied")
    return (f"exported {info['n_exported']} of {info['n_train']} training instances "
            f"({info['n_removed']} removed) to {info['path']}"
            + (f"; {copied} symlinked file(s) copied, not hard-linked" if copied else ""))


__all__ = ["export", "select", "summary_line"]
