"""Peak memory of `gancleanse influence RUN --metric fid` against the number of generated samples.

For each sample count N (default 1,000, 5,000 and 20,000) trains one run of the 28x28 digits DCGAN of
examples/digits.toml (with --quick on 8x8 digits, their own size: about 20 times cheaper per sample) with
``[metric] n_samples = N`` and a two-step recorded window (100 training images, batch 50, one epoch), trains
its metric classifier (cached in the run, so no child pays for it), then runs ``gancleanse influence RUN
--metric fid --check 0`` in a fresh child process. The child reads its own peak resident memory (VmHWM in
/proc/self/status) right after the command returns and prints it; the parent's memory never enters. Every
child runs at the same thread count (``--threads``: train.threads and the OpenMP / MKL thread variables). The
metric is taken in chunks of ``gancleanse.metrics.DEFAULT_CHUNK_SIZE`` generated samples, so the peak should be
flat in N (target: within 15% of the 1,000-sample figure); in one batch it grew by about 1 MB per sample.

Prints one row per N: peak MiB, the peak over the 1,000-sample (first) figure, seconds of the child and the FID.
The trust check (--check) is off: it retrains the window K times and only evaluates the metric without a graph.

A second section prints what the Inception feature space (``features = inception``) costs on this CPU: seconds per
1,000 images of the FID Inception-v3 (gancleanse.features.inception), forward alone (the real split and metric
values, no graph) and forward + VJP to the images (what a metric gradient pays per generated sample), at 1 and 2
torch threads, the median of ``--inception-repeats`` timed batches of ``--inception-batch`` 32x32 RGB images after
one untimed batch. The weights are random: the cost does not depend on their values.

Usage:
  .venv/bin/python bench/metric_memory.py                # 28x28, as examples/digits.toml (about 10 min on 2 cores)
  .venv/bin/python bench/metric_memory.py --quick        # 8x8: the same counts in about 3 minutes on 2 cores
  .venv/bin/python bench/metric_memory.py --counts 1000 5000 --threads 2 --dir /tmp/mm --keep
  .venv/bin/python bench/metric_memory.py --section inception   # the Inception timings alone (about 3 minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MIB = 2 ** 20
ROOT = Path(__file__).resolve().parents[1]


def config(n_samples: int, side: int, threads: int) -> dict[str, dict[str, Any]]:
    """The digits DCGAN of examples/digits.toml on images of ``side``, two recorded steps, N metric samples."""
    return {
        "data": {"name": "digits", "image_size": side, "n_train": 100, "n_valid": 397, "n_test": 400, "seed": 0},
        "model": {"arch": "dcgan", "z_dim": 32, "g_hidden": 32, "d_hidden": 32, "activation": "sigmoid",
                  "norm": "layer", "bias": True, "dtype": "float32"},
        "train": {"epochs": 1, "batch_size": 50, "optimizer": "adam", "lr_d": 2e-4, "lr_g": 2e-4,
                  "betas": [0.5, 0.999], "record_from_epoch": 0, "seed": 0, "threads": threads},
        "metric": {"n_samples": n_samples, "classifier_epochs": 20},
    }


def prepare(run_dir: Path, n_samples: int, side: int, threads: int) -> None:
    """Train the run and its metric classifier (both cached in ``run_dir``), unless already there."""
    import gancleanse as gc
    from gancleanse.config import Config
    from gancleanse.features.classifier import load_or_train_classifier

    if not (run_dir / "run.json").is_file():
        gc.train(Config.from_dict(config(n_samples, side, threads)), run_dir, progress=False)
    load_or_train_classifier(gc.Run.open(run_dir))


def peak_bytes() -> int:
    """This process's peak resident memory (VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(run_dir: str, out: str) -> None:
    """Run the influence command in this process and print its peak memory and the FID as one JSON line."""
    from gancleanse.cli import main as cli_main

    started = time.perf_counter()
    rc = cli_main(["influence", run_dir, "--metric", "fid", "--method", "itd", "--check", "0", "--quiet",
                   "--out", out, "--force"])
    seconds = time.perf_counter() - started
    fid = json.loads(Path(out).with_suffix(".json").read_text()).get("metric_value")
    print(json.dumps({"rc": rc, "peak": peak_bytes(), "seconds": seconds, "fid": fid}))


def measure(run_dir: Path, threads: int) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(run_dir), str(run_dir.parent / "scores.csv")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"child failed ({out.returncode}):\n{out.stderr}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        sys.exit(f"gancleanse influence failed ({result['rc']}):\n{out.stderr}")
    return result


def inception_seconds(threads: int, batch: int, repeats: int, side: int = 32) -> tuple[float, float]:
    """Median seconds per 1,000 images of the Inception network: (forward without a graph, forward + VJP)."""
    import torch

    from gancleanse.features.base import freeze
    from gancleanse.features.inception import InceptionV3

    torch.set_num_threads(threads)
    model = freeze(InceptionV3())
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, side, side, generator=g) * 2 - 1
    cotangents = (torch.randn(batch, 2048, generator=g), torch.randn(batch, 1008, generator=g))

    def forward() -> None:
        with torch.no_grad():
            model(images)

    def forward_vjp() -> None:
        x = images.clone().requires_grad_(True)
        torch.autograd.grad(model(x), x, cotangents)

    medians = []
    for work in (forward, forward_vjp):
        work()  # untimed: first-call allocations
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            work()
            times.append(time.perf_counter() - started)
        medians.append(statistics.median(times) / batch * 1000)
    return medians[0], medians[1]


def inception_section(batch: int, repeats: int) -> None:
    rows = [(threads, *inception_seconds(threads, batch, repeats)) for threads in (1, 2)]
    print(f"\nInception-v3 features (FID standard, 32x32 RGB resized to 299x299), float32, batch {batch}, "
          f"median of {repeats}: seconds per 1,000 images")
    print(f"{'threads':>8}{'forward':>10}{'fwd+VJP':>10}")
    for threads, forward, forward_vjp in rows:
        print(f"{threads:>8}{forward:>10.0f}{forward_vjp:>10.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", type=int, nargs="+", default=[1000, 5000, 20000], help="metric.n_samples values")
    ap.add_argument("--quick", action="store_true", help="8x8 digits instead of 28x28 (same counts, a few minutes)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads of every child (default 2)")
    ap.add_argument("--dir", type=Path, help="folder for the runs (reused when already trained); kept")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder and print its path")
    ap.add_argument("--section", choices=("all", "memory", "inception"), default="all",
                    help="which tables to print (default both)")
    ap.add_argument("--inception-batch", type=int, default=4, help="images per timed Inception batch (default 4)")
    ap.add_argument("--inception-repeats", type=int, default=3, help="timed batches per median (default 3)")
    ap.add_argument("--child", nargs=2, metavar=("RUN", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.section in ("all", "memory"):
        memory_section(args)
    if args.section in ("all", "inception"):
        inception_section(args.inception_batch, args.inception_repeats)


def memory_section(args: argparse.Namespace) -> None:
    """The peak-memory table (the child processes above)."""
    from gancleanse.metrics import DEFAULT_CHUNK_SIZE

    side = 8 if args.quick else 28
    root = args.dir if args.dir is not None else Path(tempfile.mkdtemp(prefix="metric_memory-"))
    rows = []
    try:
        for n in args.counts:
            run_dir = root / f"n{n}-side{side}" / "run"
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            prepare(run_dir, n, side, args.threads)
            rows.append((n, measure(run_dir, args.threads)))
            print(f"  n_samples {n}: done", file=sys.stderr)
    finally:
        if args.dir is None and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        elif args.dir is None:
            print(f"kept {root}", file=sys.stderr)
    print(f"influence --metric fid (ITD, two-step window), {side}x{side} digits DCGAN, "
          f"{args.threads} threads, chunk {DEFAULT_CHUNK_SIZE}; peak = the child's VmHWM")
    print(f"{'n_samples':>10}{'peak MiB':>11}{'/ first':>9}{'seconds':>9}{'FID':>10}")
    first = rows[0][1]["peak"]
    for n, r in rows:
        print(f"{n:>10}{r['peak'] / MIB:>11.0f}{r['peak'] / first:>9.3f}{r['seconds']:>9.1f}{r['fid']:>10.4g}")


if __name__ == "__main__":
    main()
