"""An image-folder dataset with known bad images, built from scikit-learn's bundled digits.

    python -m gancleanse.examples.digit_folder OUT [--size 32] [--zip] [--corrupt 0.06] [--reference 500]

writes ``OUT/images/<class>/<id>.png`` (RGB: a light digit on a dark background; the ImageFolder layout, so
``labels = "folders"`` gives the classes) or ``OUT/images.zip`` in StyleGAN's layout with a ``dataset.json``;
``OUT/planted.csv`` naming the corrupted images planted among them (``key,kind``): colour-inverted digits, uniform
noise, blank frames and off-class shapes; and ``OUT/reference/``, clean digits disjoint from the training images, the
curated set to evaluate against (``data.reference_path``). File names do not tell planted from clean images. Nothing is
downloaded: the digits ship with scikit-learn.
"""

from __future__ import annotations

import argparse
import io
import json
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np

from ..files import write_csv_atomic

KINDS = ("inverted", "noise", "blank", "shape")
INK = np.array([255, 205, 90], dtype=np.float64)  # amber strokes
PAPER = np.array([18, 28, 64], dtype=np.float64)  # on dark blue


def render_digits(size: int) -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as (N, size, size, 3) uint8 RGB, upsampled with Lanczos, and their labels."""
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    out = np.empty((len(bunch.images), size, size, 3), dtype=np.uint8)
    for i, img in enumerate(bunch.images):
        gray = Image.fromarray((img * (255.0 / 16.0)).round().astype(np.uint8))
        ink = np.asarray(gray.resize((size, size), Image.Resampling.LANCZOS), dtype=np.float64)[..., None] / 255.0
        out[i] = (PAPER + ink * (INK - PAPER)).round().clip(0, 255).astype(np.uint8)
    return out, np.asarray(bunch.target, dtype=np.int64)


def corrupt(kind: str, clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One planted image of ``kind`` (same shape as the clean digit it replaces)."""
    size = clean.shape[0]
    if kind == "inverted":
        return 255 - clean
    if kind == "noise":
        return rng.integers(0, 256, clean.shape, dtype=np.uint8)
    if kind == "blank":
        return np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), clean.shape).copy()
    if kind == "shape":  # a filled disc or box in a random colour: not a digit at all
        yy, xx = np.mgrid[:size, :size]
        cy, cx = rng.uniform(0.3, 0.7, 2) * size
        r = rng.uniform(0.15, 0.35) * size
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) if rng.random() < 0.5 else (
            (abs(yy - cy) < r) & (abs(xx - cx) < r * 0.6))
        out = np.broadcast_to(rng.integers(0, 100, 3, dtype=np.uint8), clean.shape).copy()
        out[mask] = rng.integers(120, 256, 3, dtype=np.uint8)
        return out
    raise ValueError(f"unknown corruption {kind!r}")


def write_digit_folder(out: str | Path, *, size: int = 32, n: int | None = None, corrupt_fraction: float = 0.06,
                       reference: int = 500, as_zip: bool = False, seed: int = 0,
                       classes: Sequence[int] | None = None) -> tuple[Path, list[tuple[str, str]]]:
    """Write the dataset; returns (the folder or zip to use as ``data.path``, planted (key, kind)).

    The first ``reference`` digits of a seeded permutation go to ``OUT/reference/`` (clean), the next ``n`` (default:
    the rest) to the training images, of which a fraction ``corrupt_fraction`` is replaced by planted corruptions.
    ``classes``: only these digits.
    """
    from PIL import Image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, labels = render_digits(size)
    if classes is not None:
        keep = np.isin(labels, list(classes))
        images, labels = images[keep], labels[keep]
    perm = rng.permutation(len(images))
    if reference >= len(perm):
        raise ValueError(f"reference = {reference} leaves no training digits of {len(perm)}")
    for pos, i in enumerate(perm[:reference]):
        path = out / "reference" / f"{labels[i]}/{pos:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(path, format="PNG")
    order = perm[reference:][:n]
    bad_at = set(rng.choice(len(order), int(round(corrupt_fraction * len(order))), replace=False).tolist())
    files: list[tuple[str, bytes, int]] = []
    planted: list[tuple[str, str]] = []
    for pos, i in enumerate(order):
        img = images[i]
        key = f"{labels[i]}/{pos:05d}.png"
        if pos in bad_at:
            kind = KINDS[len(planted) % len(KINDS)]
            img = corrupt(kind, img, rng)
            planted.append((key, kind))
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        files.append((key, buf.getvalue(), int(labels[i])))
    if as_zip:
        target = out / "images.zip"
        with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as z:
            for key, data, _ in files:
                z.writestr(key, data)
            z.writestr("dataset.json", json.dumps({"labels": [[k, y] for k, _, y in files]}))
    else:
        target = out / "images"
        for key, data, _ in files:
            (target / key).parent.mkdir(parents=True, exist_ok=True)
            (target / key).write_bytes(data)
    write_csv_atomic(out / "planted.csv", ["key", "kind"], sorted(planted))
    return target, sorted(planted)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="directory to write (images/ or images.zip, and planted.csv)")
    p.add_argument("--size", type=int, default=32, help="image side (default 32)")
    p.add_argument("--count", type=int, default=None, help="images in all (default: all 1,797 digits)")
    p.add_argument("--corrupt", type=float, default=0.06, help="fraction replaced by corrupted images")
    p.add_argument("--reference", type=int, default=500, help="clean digits in OUT/reference (default 500)")
    p.add_argument("--zip", action="store_true", help="write a StyleGAN-style zip with dataset.json")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    target, planted = write_digit_folder(a.out, size=a.size, n=a.count, corrupt_fraction=a.corrupt,
                                         reference=a.reference, as_zip=a.zip, seed=a.seed)
    print(f"wrote {target} ({len(planted)} planted corrupted images listed in {Path(a.out) / 'planted.csv'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
