"""Resident memory of loading an image folder, against the uint8 size of its pixels.

Writes a folder of N RGB PNG images of side S (smooth colour gradients plus a little noise,
in class subfolders 0..9; into a temporary directory, or ``--dir``, reused when it already
holds the same count and size), then loads it in a fresh child process with
``gancleanse.data.image_files.load_images`` (``labels = "folders"``). The child reads its
own /proc/self/status: VmRSS right after ``import torch, gancleanse`` (the baseline) and
VmHWM (peak resident) and VmRSS after loading.

Prints one table: images, side, the pixels' uint8 size, the same pixels as float32 and
float64 (analytic, N*3*S*S*4 and *8, for reference), the loading child's peak resident
memory over its baseline, that peak over the uint8 size, load seconds and images per second;
then the split tensors' dtype and bytes as the child saw them. Sizes in MiB (2^20 bytes).
With ``--float-child`` a second child loads the same folder and also holds the three splits
concatenated as float32, and its peak over baseline is printed as well.

Usage:
  .venv/bin/python bench/image_memory.py                          # 20000 images of 64x64
  .venv/bin/python bench/image_memory.py --count 2000 --size 32   # quick
  .venv/bin/python bench/image_memory.py --dir /tmp/imgs --keep   # keep (and reuse) the folder
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MIB = 2 ** 20
CLASSES = 10
MARKER = ".image_memory.json"  # hidden, so the loader skips it
N_EVAL = 1000  # n_valid and n_test, reduced for small counts


# ------------------------------------------------------------------------ generation
def make_image(i: int, size: int) -> np.ndarray:
    """A seeded (size, size, 3) uint8 image: a linear colour gradient plus noise of +-3."""
    rng = np.random.default_rng(i)
    t = np.linspace(0.0, 1.0, size)
    yy, xx = np.meshgrid(t, t, indexing="ij")
    start = rng.uniform(0, 255, 3)
    slope = rng.uniform(-160, 160, (2, 3))
    img = start + xx[..., None] * slope[0] + yy[..., None] * slope[1]
    img += rng.integers(-3, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_chunk(args: tuple[str, int, int, int]) -> int:
    from PIL import Image

    root, start, stop, size = args
    for i in range(start, stop):
        Image.fromarray(make_image(i, size)).save(Path(root) / str(i % CLASSES) / f"{i:06d}.png",
                                                  compress_level=1)
    return stop - start


def generate(root: Path, count: int, size: int) -> tuple[bool, float]:
    """Write the folder unless it already holds this count and size: (reused, seconds)."""
    meta = {"count": count, "size": size}
    marker = root / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == meta:
        return True, 0.0
    if root.exists() and any(root.iterdir()):
        sys.exit(f"{root} is not empty and was not written by this script for --count {count} "
                 f"--size {size}; give an empty or new --dir")
    tic = time.perf_counter()
    for c in range(CLASSES):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
    step = max(1, min(1000, count // (4 * (os.cpu_count() or 1)) or 1))
    chunks = [(str(root), a, min(a + step, count), size) for a in range(0, count, step)]
    with multiprocessing.Pool() as pool:
        for _ in pool.imap_unordered(write_chunk, chunks):
            pass
    marker.write_text(json.dumps(meta))
    return False, time.perf_counter() - tic


# ----------------------------------------------------------------------------- child
def proc_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes, from /proc/self/status."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024  # reported in kB
    return out


def child(root: str, n_eval: int, as_float: bool) -> None:
    """Load the folder in this process and print what it measured as one JSON line."""
    import torch

    import gancleanse  # noqa: F401 - part of the baseline
    from gancleanse.config import Config
    from gancleanse.data.image_files import load_images

    base = proc_status()
    cfg = Config.from_dict({"data": {"name": "images", "path": root, "n_valid": n_eval, "n_test": n_eval,
                                     "labels": "folders"}})
    tic = time.perf_counter()
    splits = load_images(cfg.data)
    seconds = time.perf_counter() - tic
    loaded = proc_status()
    parts = {name: getattr(splits, name) for name in ("train", "valid", "test")}
    result = {
        "baseline_rss": base["VmRSS"], "baseline_hwm": base["VmHWM"],
        "loaded_rss": loaded["VmRSS"], "peak": loaded["VmHWM"], "seconds": seconds,
        "dtype": str(parts["train"].dtype).replace("torch.", ""),
        "shape": list(parts["train"].shape[1:]),
        "bytes": {k: v.numel() * v.element_size() for k, v in parts.items()},
        "rows": {k: v.shape[0] for k, v in parts.items()},
    }
    if as_float:
        held = torch.cat(list(parts.values())).float()
        after = proc_status()
        result["float_bytes"] = held.numel() * held.element_size()
        result["float_peak"] = after["VmHWM"]
    print(json.dumps(result))


def run_child(root: Path, n_eval: int, as_float: bool) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(root), "--n-eval", str(n_eval)]
    if as_float:
        cmd.append("--float-child")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")) if p)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"child failed ({out.returncode}):\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=20000, help="images (default 20000)")
    ap.add_argument("--size", type=int, default=64, help="side in pixels (default 64)")
    ap.add_argument("--dir", type=Path, help="folder to write (or reuse) the images in; kept")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder and print its path")
    ap.add_argument("--float-child", action="store_true",
                    help="also measure a second child that holds the splits as float32")
    ap.add_argument("--child", metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--n-eval", type=int, default=N_EVAL, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.n_eval, args.float_child)
        return
    if args.count < 3 or args.size < 1:
        ap.error("--count must be at least 3 and --size at least 1")
    n_eval = min(N_EVAL, max(1, args.count // 10))

    root = args.dir if args.dir is not None else Path(tempfile.mkdtemp(prefix="image_memory-"))
    try:
        reused, gen_s = generate(root, args.count, args.size)
        print(f"{args.count} PNGs of {args.size}x{args.size} in {root}: "
              + ("reused" if reused else f"written in {gen_s:.1f} s") + f"; n_valid = n_test = {n_eval}",
              file=sys.stderr)
        r = run_child(root, n_eval, as_float=False)
        rf = run_child(root, n_eval, as_float=True) if args.float_child else None
    finally:
        if args.dir is None and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        elif args.dir is None:
            print(f"kept {root}", file=sys.stderr)

    n, s = args.count, args.size
    uint8 = n * 3 * s * s
    over = r["peak"] - r["baseline_rss"]
    print(f"{'images':>8}{'side':>6}{'uint8 MiB':>11}{'float32 MiB':>13}{'float64 MiB':>13}"
          f"{'peak-base MiB':>15}{'peak/uint8':>12}{'load s':>9}{'img/s':>9}")
    print(f"{n:>8}{s:>6}{uint8 / MIB:>11.1f}{4 * uint8 / MIB:>13.1f}{8 * uint8 / MIB:>13.1f}"
          f"{over / MIB:>15.1f}{over / uint8:>12.2f}{r['seconds']:>9.2f}{n / r['seconds']:>9.0f}")
    total = sum(r["bytes"].values())
    print(f"child: baseline RSS {r['baseline_rss'] / MIB:.1f} MiB after import torch, gancleanse; "
          f"RSS after load {r['loaded_rss'] / MIB:.1f} MiB, peak {r['peak'] / MIB:.1f} MiB; "
          f"splits {r['dtype']} {tuple(r['shape'])}, "
          + ", ".join(f"{k} {r['rows'][k]} = {b / MIB:.1f} MiB" for k, b in r["bytes"].items())
          + f" (total {total / MIB:.1f} MiB)")
    if rf is not None:
        fo = rf["float_peak"] - rf["baseline_rss"]
        print(f"float32 child: splits as float32 {rf['float_bytes'] / MIB:.1f} MiB, peak over baseline "
              f"{fo / MIB:.1f} MiB ({fo / uint8:.2f} x uint8)")


if __name__ == "__main__":
    main()
