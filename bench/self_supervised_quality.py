"""Does the self-supervised encoder's FD rank images like the classifier's FID?

(a) One DCGAN run on the labelled digits (examples/digits.toml, the whole training recorded so that its
checkpoints cover it): FID in the classifier space and FD in the self-supervised space of the generator at
every checkpoint, on the test split, and the Spearman correlation of the two orderings (target >= 0.9).
(b) FD between the test images and the same images with a fraction f replaced by a corruption (uniform
noise, pixels shuffled within each image, a 5x5 box blur), in both spaces: it should grow with f.
Also prints the encoder's training time and loss curve (from its cache, RUN/self_supervised.json).

    .venv/bin/python bench/self_supervised_quality.py [--out /tmp/ssl_bench] [--epochs 15] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

import gancleanse as gc
from gancleanse.config import Config, embedded_config
from gancleanse.features import load_feature_model
from gancleanse.metrics import make_metric
from gancleanse.metrics.fid import frechet_inception_distance

SPACES = ("classifier", "self_supervised")
FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)


def digits_config(epochs: int, checkpoint_every: int, threads: int) -> Config:
    """examples/digits.toml with every step recorded (checkpoints from step 0) and ``epochs`` epochs."""
    raw = embedded_config("digits").to_dict()
    raw["train"].update(epochs=epochs, record_from_epoch=0, checkpoint_every=checkpoint_every, threads=threads,
                        device="cpu")
    return Config.from_dict({k: {kk: vv for kk, vv in v.items() if vv is not None} for k, v in raw.items()})


def metric_along_training(path: Path, space: str) -> list[float]:
    """The test FID in ``space`` of the generator at every checkpoint of the run."""
    run = gc.Run.open(path, features=space)
    metric = make_metric("fid", run, "test")
    return [metric.value(run.load_state(step)) for step in run.checkpoint_steps]


def nearest_neighbour_accuracy(path: Path, space: str) -> float:
    """How often a test image's nearest training image in ``space`` has its label (how semantic the space is)."""
    run = gc.Run.open(path, features=space)
    model = load_feature_model(run)
    train, test = model.evaluate(run.splits.train)[0], model.evaluate(run.splits.test)[0]
    nearest = torch.cdist(test, train).argmin(dim=1)
    return float((run.splits.y_train[nearest] == run.splits.y_test).double().mean())


def corrupt(x: torch.Tensor, fraction: float, kind: str, generator: torch.Generator) -> torch.Tensor:
    """``x`` with its first ``fraction`` of images replaced by a corrupted version."""
    out, k = x.clone(), int(round(fraction * x.shape[0]))
    if kind == "noise":
        out[:k] = torch.rand(out[:k].shape, generator=generator, dtype=x.dtype) * 2 - 1
    elif kind == "shuffle":
        pixels = torch.randperm(x[0].numel(), generator=generator)
        out[:k] = out[:k].flatten(1)[:, pixels].view(out[:k].shape)
    else:
        out[:k] = F.avg_pool2d(out[:k], 5, stride=1, padding=2, count_include_pad=False)
    return out


def corruption_table(path: Path) -> None:
    """(b): FD against the corruption fraction in both spaces, and whether it grows monotonically."""
    print("\n(b) FD(test, test with a fraction f corrupted); f =", ", ".join(f"{f:g}" for f in FRACTIONS))
    for space in SPACES:
        run = gc.Run.open(path, features=space)
        model = load_feature_model(run)
        real = run.real("test")
        real_features = model.evaluate(real)[0]
        for kind in ("noise", "shuffle", "blur"):
            generator = torch.Generator().manual_seed(0)
            values = [float(frechet_inception_distance(real_features, model.evaluate(
                corrupt(real, f, kind, generator))[0])) for f in FRACTIONS]
            monotone = all(a < b for a, b in zip(values, values[1:]))
            print(f"  {space:>15} {kind:>7}: {' '.join(f'{v:9.4f}' for v in values)}  monotone={monotone}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/ssl_bench")
    p.add_argument("--epochs", type=int, default=15, help="GAN training epochs (20 steps each)")
    p.add_argument("--checkpoint-every", type=int, default=20, help="steps between the states compared")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)

    started = time.perf_counter()
    run = gc.train(digits_config(args.epochs, args.checkpoint_every, args.threads), out / "run", force=True,
                   progress=False)
    print(f"(a) DCGAN on digits: {run.n_train} training images, {run.final_step} steps, "
          f"{len(run.checkpoint_steps)} states; trained in {time.perf_counter() - started:.0f} s")
    values = {}
    for space in SPACES:
        started = time.perf_counter()
        values[space] = metric_along_training(run.path, space)
        print(f"  {space}: loaded and evaluated in {time.perf_counter() - started:.0f} s")
    meta = json.loads((run.path / "self_supervised.json").read_text())
    print(f"  encoder: {meta['n_train']} images, {meta['settings']['epochs']} epochs, trained in "
          f"{meta['train_seconds']:.1f} s; NT-Xent per epoch {meta['loss_curve'][0]:.3f} -> {meta['loss_curve'][-1]:.3f}")
    print(f"  {'step':>6} {'FID classifier':>15} {'FD self-sup.':>13}")
    for step, a, b in zip(run.checkpoint_steps, values["classifier"], values["self_supervised"]):
        print(f"  {step:>6} {a:15.4f} {b:13.4f}")
    rho = spearmanr(values["classifier"], values["self_supervised"]).statistic
    late = len(run.checkpoint_steps) // 2
    rho_late = spearmanr(values["classifier"][late:], values["self_supervised"][late:]).statistic
    print(f"  Spearman(FID classifier, FD self-supervised) over all {len(run.checkpoint_steps)} states: {rho:.3f} "
          f"(target >= 0.9); over the last {len(run.checkpoint_steps) - late}: {rho_late:.3f}")
    print("  1-NN label accuracy of the features (test against train): " + ", ".join(
        f"{space} {nearest_neighbour_accuracy(run.path, space):.3f}" for space in SPACES))
    corruption_table(run.path)


if __name__ == "__main__":
    main()
