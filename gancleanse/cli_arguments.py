"""The command line's arguments: one function per command adds its own, scorer flags come from the options dataclasses
(``gancleanse.options``), choices and defaults from ``gancleanse.specs``."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, Iterable

from .errors import GancleanseError
from .specs import DEFAULT_CHECK, FEATURE_CHOICES, FEATURES, METHODS, METRICS, SCORERS
from .validation import declared_type


def _option_dest(scorer: str, name: str) -> str:
    return f"option__{scorer}__{name}"


def add_scorer_options(sp: argparse.ArgumentParser) -> None:
    """One flag per field of every scorer's options dataclass (``gancleanse.options``)."""
    for spec in SCORERS.values():
        fields = dataclasses.fields(spec.options)
        if not fields:
            continue
        group = sp.add_argument_group(f"{spec.name} options (with --method {spec.name})")
        for f in fields:
            default = "" if f.default is None else f" (default {f.default})"
            group.add_argument(spec.options.flag(f.name), dest=_option_dest(spec.name, f.name),
                               type={"int": int, "float": float, "str": str}[declared_type(f)], default=None,
                               choices=f.metadata["choices"], metavar=f.metadata["metavar"],
                               help=f.metadata["doc"] + default)


def given_options(args: argparse.Namespace, methods: Iterable[str], *, option: str) -> dict[str, dict[str, Any]]:
    """The scorer options given on the command line, per method; a flag of a scorer not in ``methods`` is an error
    (``option``: "--method" or "--methods", how the command names them)."""
    methods = list(methods)
    given: dict[str, dict[str, Any]] = {}
    for spec in SCORERS.values():
        for f in dataclasses.fields(spec.options):
            value = getattr(args, _option_dest(spec.name, f.name), None)
            if value is None:
                continue
            if spec.name not in methods:
                scope = (f"--method {spec.name}, not {methods[0]}" if option == "--method"
                         else f"{spec.name}, which --methods does not include")
                raise GancleanseError(f"{spec.options.flag(f.name)} applies to {scope}")
            given.setdefault(spec.name, {})[f.name] = value
    return given


SEED_LIMIT = 2**63  # seeds feed torch.Generator.manual_seed, which takes 64-bit values


def integer(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [lo, hi), so a bad count or seed is refused before any work."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo or (hi is not None and value >= hi):
            bound = f">= {lo}" if hi is None else f"in {lo}..{hi - 1}"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {value}")
        return value
    return parse


positive_int, count, seed, workers = integer(1), integer(0), integer(0, SEED_LIMIT), integer(1, 1025)


def _common(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--device", default=None, metavar="DEVICE",
                    help="auto, cpu, cuda or cuda:N (default: the config's train.device, auto: CUDA when available)")
    sp.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


FEATURES_HELP = ("the network is/log_is/fid/kid see images through: auto, classifier (trained on the labels), "
                 "inception (the FID standard's weights file), self_supervised (trained here without labels), "
                 "torchscript (--extractor); default: the run's [metric] features")


def _on_run(sp: argparse.ArgumentParser, features: tuple[str, ...] = FEATURE_CHOICES,
            features_help: str = FEATURES_HELP) -> None:
    """What every command that reads a run directory takes."""
    sp.add_argument("run", help="run directory written by `gancleanse train`")
    sp.add_argument("--metric", choices=METRICS, default="all")
    sp.add_argument("--features", choices=features, default=None, help=features_help)
    sp.add_argument("--extractor", default=None, metavar="FILE.pt",
                    help="TorchScript feature extractor for is/log_is/fid/kid (loading it runs its code, so a "
                         "run's stored metric.extractor is used only when named here)")
    _common(sp)


def _output(sp: argparse.ArgumentParser, what: str, required: bool = True) -> None:
    sp.add_argument("--out", required=required, default=None, help=f"{what} to write")
    sp.add_argument("--force", action="store_true", help=f"replace an existing {what.split()[0]}")


def train_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("config", help="TOML config file")
    sp.add_argument("--out", required=True, help="run directory to create")
    sp.add_argument("--force", action="store_true", help="replace an existing run directory, or start an interrupted "
                    "training over instead of resuming it")
    _common(sp)


def influence_arguments(sp: argparse.ArgumentParser) -> None:
    _on_run(sp, FEATURES, FEATURES_HELP.replace("default: the run's [metric] features", "also what isolation_forest"
                                                " / knn_density fit on (default: raw data for them, else the run's "
                                                "[metric] features)"))
    sp.add_argument("--method", choices=METHODS, default="itd")
    _output(sp, "SCORES.csv (index,influence,harmfulness,key; SCORES.json beside it says what produced it)")
    sp.add_argument("--horizons", action="store_true",
                    help="also write the estimate for every number of epochs traced back (SCORES.horizons.csv)")
    sp.add_argument("--top", type=positive_int, default=0, metavar="K", help="print the K most harmful instances")
    sp.add_argument("--seed", type=seed, default=0, help="random / isolation_forest / aid / trust-check seed")
    sp.add_argument("--check", type=int, default=None, metavar="K",
                    help=f"trust check: retrain without K instances (half from the ranking's extremes) and report "
                         f"Kendall tau and Pearson against the actual changes, with 90%% intervals, in SCORES.json "
                         f"(default {DEFAULT_CHECK}; 0: skip)")
    add_scorer_options(sp)


def counterfactual_arguments(sp: argparse.ArgumentParser) -> None:
    _on_run(sp)
    sp.add_argument("--remove", required=True, metavar="I[,I...]", help="training indices to remove")
    sp.add_argument("--from-epoch", type=count, default=None,
                    help="restart at this epoch's start (inside the recorded window) instead of the window start")


def validate_arguments(sp: argparse.ArgumentParser) -> None:
    _on_run(sp)
    sp.add_argument("--method", choices=METHODS, default="itd")
    sp.add_argument("--instances", type=positive_int, default=20, metavar="K", help="instances to retrain without")
    _output(sp, "VALID.json (a scatter plot goes beside it)")
    sp.add_argument("--seed", type=seed, default=0, help="seed of the instance choice")
    sp.add_argument("--extremes", action="store_true",
                    help="take half of the instances from the extremes of the estimate")
    sp.add_argument("--horizons", action="store_true", help="validate every recorded horizon (itd)")
    sp.add_argument("--executor", choices=("local", "ray"), default="local")
    sp.add_argument("--workers", type=workers, default=1, help="parallel retrains")
    sp.add_argument("--batched", action="store_true",
                    help="advance retrains together by one vmapped step (faster on small networks; equal to "
                         "rounding, not bitwise)")
    add_scorer_options(sp)


def lds_arguments(sp: argparse.ArgumentParser) -> None:
    _on_run(sp)
    sp.add_argument("--methods", default=",".join(METHODS), metavar="M[,M...]",
                    help="scorers to compare (default: every one)")
    sp.add_argument("--subsets", type=positive_int, default=50, metavar="S", help="random subsets to retrain without")
    sp.add_argument("--fraction", type=float, default=0.1, metavar="F",
                    help="each subset's share of the training split (0 < F < 1)")
    sp.add_argument("--seed", type=seed, default=0, help="seed of the subsets (and of seeded scorers)")
    _output(sp, "LDS.json (per scorer: lds, interval, predicted; actual)", required=False)
    add_scorer_options(sp)


def cleanse_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("config", help="TOML config with a [cleanse] section")
    sp.add_argument("--out", required=True, help="study directory (resumed if it exists)")
    sp.add_argument("--executor", choices=("local", "ray"), default="local")
    sp.add_argument("--workers", type=workers, default=1, help="parallel jobs")
    sp.add_argument("--no-report", action="store_true", help="skip report.html")
    sp.add_argument("--export", default=None, metavar="CLEANED_DIR",
                    help="apply the scorer and rate chosen on the validation split (first metric) to the full "
                         "training split and write the cleaned data there, in its own format")
    sp.add_argument("--force", action="store_true", help="replace an earlier export at --export")
    _common(sp)


def export_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("scores", help="SCORES.csv written by `gancleanse influence` (its .json names the run)")
    how = sp.add_mutually_exclusive_group()
    how.add_argument("--rate", type=float, help="remove the most harmful fraction R of the training split")
    how.add_argument("--count", type=count, default=None, help="remove the N most harmful instances")
    sp.add_argument("--min-harmfulness", type=float, default=None, metavar="H",
                    help="remove only instances with harmfulness >= H (alone: all of them)")
    sp.add_argument("--out", required=True, help="directory to create (the data, removed.csv, removed.png)")
    sp.add_argument("--run", default=None, help="run directory of the scores (default: from SCORES.json)")
    sp.add_argument("--link", action="store_true", help="hard-link image files instead of copying them")
    sp.add_argument("--all-splits", action="store_true", help="also export the validation and test instances")
    sp.add_argument("--force", action="store_true", help="replace an earlier export at --out")


def report_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("dir", help="study directory written by `gancleanse cleanse`")


def verify_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("run", help="run directory written by `gancleanse train`, or a study directory")
    sp.add_argument("--no-replay", action="store_true", help="skip replaying the recorded window")
    _common(sp)


def weights_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("name", choices=("inception",), help="inception: the Inception-v3 weights of the FID standard")
    sp.add_argument("--to", default=None, metavar="PATH",
                    help="file to write (default: the torch hub checkpoint cache, where features = inception looks)")
    sp.add_argument("--url", default=None, help="another address serving the same file (its sha256 is checked)")


def demo_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--out", default="runs/demo", help="output directory (default runs/demo; resumed)")
    sp.add_argument("--workers", type=workers, default=1, help="parallel jobs")
    _common(sp)
