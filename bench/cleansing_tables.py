"""Paper-style cleansing tables beside the papers' numbers: the shipped example studies and MNIST.

Runs (or resumes) `gancleanse cleanse` on examples/gaussian2d.toml, examples/digits.toml or the ICLR 2021
MNIST protocol and prints, per evaluated metric, the mean (std) change of the test metric per method and
removal rate with the one-sample t-test p-value against no change, then the journal's protocol (rate chosen
on the validation split), each table followed by the paper's numbers (DESIGN.md section 3). The 2d and
digits studies are scaled down (the papers used 50k instances, 15 seeds): compare directions and
significance rather than magnitudes.

`--study mnist` (or `--setup mnist`) is the paper's cleansing protocol on the real MNIST files in
../shared/data/mnist (`--data DIR` elsewhere; the four gzipped IDX files): 50k / 10k / 10k, the 7-layer
sigmoid + LayerNorm DCGAN, simultaneous SGD lr 1e-3, batch 100, weight decay 1e-3, 20 epochs, the last one
traced back and retrained; FID and IS (classifier features, 10k generated samples) scored and evaluated;
ITD, Isolation Forest (raw pixels and classifier features) and random; 0 to 50% removed; 3 seeds (the paper
had 15). Hours per seed on a CPU: the study directory keeps every finished step and a killed training keeps
its resume checkpoints, so rerunning the same command continues where it stopped. `--smoke` runs the same
pipeline on 1,000 images for 2 epochs to check it end to end (its numbers mean nothing); `--cost` times one
epoch of training at the full size and ITD over it, the unit of the protocol's cost.

Usage:
  .venv/bin/python bench/cleansing_tables.py --study 2d [--workers 2] [--out runs/bench-2d]
  .venv/bin/python bench/cleansing_tables.py --study digits
  .venv/bin/python bench/cleansing_tables.py --study 2d --seeds 0 1 2     # fewer replicates
  .venv/bin/python bench/cleansing_tables.py --setup mnist --workers 2    # resumable, hours per seed
  .venv/bin/python bench/cleansing_tables.py --setup mnist --smoke        # minutes: end to end on 1,000 images
  .venv/bin/python bench/cleansing_tables.py --setup mnist --cost         # one epoch and its ITD at 50k
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import gancleanse as gc
from gancleanse.config import Config
from gancleanse.specs import HIGHER_IS_BETTER
from gancleanse.study.cleanse import scorers_for

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "gancleanse" / "examples"
STUDIES = {"2d": EXAMPLES / "gaussian2d.toml", "digits": EXAMPLES / "digits.toml", "mnist": None}
MNIST_DIR = ROOT.parent / "shared" / "data" / "mnist"
MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
               "t10k-labels-idx1-ubyte.gz")

MNIST = {  # the ICLR 2021 cleansing protocol (DESIGN.md section 3); data.path is added from --data
    "data": {"name": "mnist", "n_train": 50000, "n_valid": 10000, "n_test": 10000},
    "model": {"arch": "dcgan", "z_dim": 32, "g_hidden": 32, "d_hidden": 32, "activation": "sigmoid",
              "norm": "layer", "bias": True, "dtype": "float32"},
    "train": {"epochs": 20, "batch_size": 100, "optimizer": "sgd", "lr_d": 1e-3, "lr_g": 1e-3,
              "weight_decay_d": 1e-3, "weight_decay_g": 1e-3, "update": "simultaneous", "record_from_epoch": 19,
              "checkpoint_every": 25},  # as the first seeds' trainings were recorded: they resume with it
    # the paper's classifier: 50 epochs of Adam, lr 1e-2, batch 128; 10k generated samples per evaluation
    "metric": {"n_samples": 10000, "classifier_epochs": 50},
    # no trust check: the paper's protocol has none, and it would add 32 retrains per seed
    "cleanse": {"metrics": ["fid", "is"], "methods": ["itd", "isolation_forest", "random"],
                "removal_rates": [0.0, 0.1, 0.2, 0.4, 0.5], "seeds": [0, 1, 2], "retrain": "window", "check": 0},
}
SMOKE = {  # --smoke: the MNIST pipeline end to end in minutes; not the protocol, its numbers mean nothing
    "data": {"n_train": 1000, "n_valid": 500, "n_test": 500},
    "train": {"epochs": 2, "record_from_epoch": 1},
    "metric": {"n_samples": 500, "classifier_epochs": 2},
    "cleanse": {"seeds": [0]},
}

PAPER = {  # ICLR 2021 (DESIGN.md section 3): per metric, mean (std) change of the test metric
    "2d": {"all": "ICLR 2021 (2D, 50k, 15 seeds, last epoch retrained): ITD +0.0008 (0.0006) removing 1%, "
                  "+0.0040 (0.0049) removing 10%; random flat; Isolation Forest no consistent gain"},
    "digits": {"fid": "ICLR 2021 (MNIST, 50k, 15 seeds, last epoch retrained): ITD -0.38 (0.36) removing 40% "
                      "(from about 1.84); Isolation Forest worse at every rate; random flat",
               "is": "ICLR 2021 (MNIST, 50k, 15 seeds, last epoch retrained): ITD +0.14 (0.14) removing 50% "
                     "(from about 5.80)"},
}
PAPER["mnist"] = PAPER["digits"]


def check_mnist(data: Path) -> None:
    """Exit with one line naming where the MNIST files go when ``data`` lacks one (gzipped or not)."""
    if any(not (data / name).is_file() and not (data / name[:-3]).is_file() for name in MNIST_FILES):
        raise SystemExit(f"MNIST not found: put {', '.join(MNIST_FILES)} in {data} (or pass --data DIR)")


def mnist_config(data: Path, smoke: bool) -> Config:
    """The MNIST protocol's config (reduced by ``SMOKE``), or exit naming where the MNIST files go."""
    check_mnist(data)
    raw = json.loads(json.dumps(MNIST))
    raw["data"]["path"] = str(data)
    for section, values in (SMOKE if smoke else {}).items():
        raw[section].update(values)
    return Config.from_dict(raw, "the MNIST protocol")


def print_tables(name: str, label: str, summary: dict) -> None:
    rows = summary["by_rate"]
    for metric in sorted({r["eval_metric"] for r in rows}):
        better = "higher" if HIGHER_IS_BETTER[metric] else "lower"
        print(f"\n{label}: change of the test {metric} ({better} is better) after removal and retraining")
        print(f"{'scorer':<30}{'rate':>6}{'removed':>9}{'before':>12}{'mean change':>14}{'(std)':>12}{'p':>8}")
        for r in rows:
            if r["eval_metric"] != metric:
                continue
            p = "" if r["p_value"] is None else f"{r['p_value']:.3f}"
            print(f"{r['method'] + '-' + r['score_metric']:<30}{r['removal_rate']:>6g}{r['n_removed']:>9}"
                  f"{r['mean_before']:>12.4f}{r['mean_delta']:>+14.5f}{'(' + format(r['std_delta'], '.5f') + ')':>12}{p:>8}")
        print("rate chosen on the validation split (journal protocol):")
        for r in summary["rate_chosen_on_validation"]:
            if r["eval_metric"] == metric:
                p = "" if r["p_value"] is None else f"{r['p_value']:.3f}"
                print(f"  {r['method'] + '-' + r['score_metric']:<28} rates {r['chosen_rates']}  "
                      f"mean change {r['mean_delta']:+.5f} ({r['std_delta']:.5f})  p {p}")
        if metric in PAPER[name]:
            print(f"paper: {PAPER[name][metric]}")


def print_costs(out: Path, seeds: list[int], seconds: float) -> None:
    """This sitting's wall time, and per seed what its run and ITD scores recorded (they survive resuming)."""
    print(f"\nstudy time this sitting: {seconds / 60:.1f} min")
    for s in seeds:
        seed_dir = out / "seeds" / f"seed_{s}"
        run = json.loads((seed_dir / "run" / "run.json").read_text())
        itd = {f.stem: json.loads(f.read_text())["seconds"] for f in sorted((seed_dir / "scores").glob("itd-*.json"))}
        print(f"  seed {s}: training {run['seconds']['train'] / 60:.1f} min ({run['total_steps']} steps, "
              f"{run['threads']} thread(s)); " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in itd.items()))


def measure_cost(cfg: Config, workdir: Path) -> None:
    """Time the units of one seed's cost at the protocol's size, on one thread: a training epoch (recorded), ITD
    over it on each scored metric, the metrics' feature network and one evaluation of every metric on the test
    and validation splits; then the seed's estimate (the window's retrains each cost about one epoch: a removal
    of 10% or more meets its first removed instance in the first few steps)."""
    import torch
    from gancleanse.metrics import make_metric

    torch.set_num_threads(1)
    one = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=1, record_from_epoch=0, threads=1))
    run_dir = workdir / "run"
    run = gc.Run.open(run_dir) if (run_dir / "run.json").is_file() else gc.train(one, run_dir)  # resumes
    epoch = run.meta["seconds"]["train"]
    print(f"one epoch: {epoch:.0f} s ({run.steps_per_epoch} steps, {epoch / run.steps_per_epoch:.3f} s/step)")
    tic = time.perf_counter()
    metrics = {m: make_metric(m, run, "valid") for m in cfg.cleanse.metrics}
    features = time.perf_counter() - tic
    print(f"the metrics' feature network (trained once per seed): {features:.0f} s")
    itd = {}
    for m in cfg.cleanse.metrics:
        itd[m] = float(gc.influence(run, m, "itd", check=0).info["seconds"])
        print(f"ITD on {m} over the epoch: {itd[m]:.0f} s ({itd[m] / epoch:.1f}x the epoch's training)")
    tic = time.perf_counter()
    for m in cfg.cleanse.metrics:
        for split in ("test", "valid"):
            (metrics[m] if split == "valid" else make_metric(m, run, split)).value(run.final_state())
    evaluation = time.perf_counter() - tic
    print(f"one evaluation of {', '.join(cfg.cleanse.metrics)} on test and valid: {evaluation:.0f} s")
    scorers = scorers_for(cfg, run.feature_space)  # a retrain per scorer and nonzero rate, one shared at rate 0
    retrains = len(scorers) * sum(1 for r in cfg.cleanse.removal_rates if r > 0) + 1
    evaluations = retrains + 1  # and the original's
    total = (cfg.train.epochs + retrains) * epoch + features + sum(itd.values()) + evaluations * evaluation
    print(f"per seed, estimated: {cfg.train.epochs} epochs of training {cfg.train.epochs * epoch / 3600:.1f} h, "
          f"ITD {sum(itd.values()) / 60:.0f} min, {retrains} retrains of the last epoch "
          f"{retrains * epoch / 3600:.1f} h, {evaluations} evaluations {evaluations * evaluation / 60:.0f} min: "
          f"about {total / 3600:.1f} h on one thread (the other scorers not counted)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", "--setup", dest="study", choices=list(STUDIES), nargs="+", default=["2d"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="*", default=None, help="override [cleanse] seeds")
    ap.add_argument("--out", default=None, help="study directory (default runs/bench-<study>); resumed")
    ap.add_argument("--data", type=Path, default=MNIST_DIR, help="mnist: the directory of the four IDX files")
    ap.add_argument("--smoke", action="store_true",
                    help="mnist: a SMOKE RUN (1,000 images, 2 epochs, 1 seed) to check the pipeline, not the protocol")
    ap.add_argument("--cost", action="store_true", help="mnist: time one training epoch and ITD over it, full size")
    args = ap.parse_args()
    if (args.smoke or args.cost) and args.study != ["mnist"]:
        raise SystemExit("--smoke and --cost apply to --study mnist alone")
    for name in args.study:
        cfg = mnist_config(args.data, args.smoke) if name == "mnist" else gc.load_config(STUDIES[name])
        if args.seeds:
            cfg = dataclasses.replace(cfg, cleanse=dataclasses.replace(cfg.cleanse, seeds=list(args.seeds)))
        label = f"{name} SMOKE RUN (1,000 images, 2 epochs: checks the pipeline, numbers mean nothing)" \
            if args.smoke else name
        out = Path(args.out or f"runs/bench-{name}{'-smoke' if args.smoke else '-cost' if args.cost else ''}")
        if args.cost:
            measure_cost(cfg, out)
            continue
        print(f"{' '.join(sys.argv)}\nstudy {out}: {label}", flush=True)
        tic = time.perf_counter()
        summary = gc.cleanse(cfg, out, workers=args.workers)
        print_tables(name, label, summary)
        print_costs(out, list(cfg.cleanse.seeds), time.perf_counter() - tic)
        print(f"report: {out / 'report.html'}")


if __name__ == "__main__":
    main()
