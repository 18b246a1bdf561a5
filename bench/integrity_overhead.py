"""What verifying every read costs: hashing time inside `influence`, and `verify`'s own time.

Trains the digits DCGAN of examples/digits.toml (shortened), then, in one process at one
thread count, times ITD influence on FID while counting the seconds spent in sha256 of the
files it reads, and times `verify` with and without the bitwise replay. Prints medians over
--repeats and the ratios: hashing / influence, verify / recorded-window training.

    python bench/integrity_overhead.py [--epochs 3] [--repeats 3] [--out /tmp/integrity_bench]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import gancleanse as gc
import gancleanse.run as run_module
from gancleanse.cli import embedded_config
from gancleanse.verify import verify_run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="/tmp/integrity_bench")
    args = p.parse_args()
    torch.set_num_threads(1)

    cfg = embedded_config("digits")
    raw = cfg.to_dict()
    raw["train"].update(epochs=args.epochs, record_from_epoch=args.epochs - 1)
    raw["cleanse"] = {}
    cfg = gc.Config.from_dict({k: {kk: vv for kk, vv in v.items() if vv is not None} for k, v in raw.items()})
    run = gc.train(cfg, Path(args.out) / "run", force=True, progress=False)
    window_train = run.meta["seconds"]["window_steps"]
    size = sum((run.path / name).stat().st_size for name in run.meta["files"])
    print(f"run: {run.n_train} digits 28x28, DCGAN, {run.final_step - run.window_start} window steps, "
          f"{len(run.checkpoint_steps)} checkpoints, {size / 1e6:.1f} MB hashed files; window training "
          f"{window_train:.2f} s (1 thread)")

    hashing: list[float] = []
    real_read = run_module.read_verified

    def timed_read(root, name, expected):  # noqa: ANN001, ANN202
        tic = time.perf_counter()
        try:
            return real_read(root, name, expected)
        finally:
            hashing[-1] += time.perf_counter() - tic

    run_module.read_verified = timed_read
    influence, hashed = [], []
    for _ in range(args.repeats):
        hashing.append(0.0)
        tic = time.perf_counter()
        gc.influence(gc.Run.open(run.path), "fid", "itd", check=0, progress=False)
        influence.append(time.perf_counter() - tic)
        hashed.append(hashing[-1])
    run_module.read_verified = real_read

    def median_time(fn) -> float:  # noqa: ANN001
        times = []
        for _ in range(args.repeats):
            tic = time.perf_counter()
            fn()
            times.append(time.perf_counter() - tic)
        return statistics.median(times)

    quiet = lambda line: None  # noqa: E731
    verify_fast = median_time(lambda: verify_run(gc.Run.open(run.path), replay=False, report=quiet))
    verify_full = median_time(lambda: verify_run(gc.Run.open(run.path), replay=True, report=quiet))
    inf, h = statistics.median(influence), statistics.median(hashed)
    print(f"influence (itd, fid): {inf:.2f} s median, of which reading + hashing verified files {h:.3f} s "
          f"= {100 * h / inf:.2f}%")
    print(f"verify --no-replay: {verify_fast:.2f} s; verify: {verify_full:.2f} s = "
          f"{verify_full / window_train:.2f}x the window's training steps")


if __name__ == "__main__":
    main()
