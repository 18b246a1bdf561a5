"""What gancleanse can measure and how it can rank: the registries every layer reads.

A leaf module: the config validates names against it, the CLI builds its choices and flags from it, the study decides
what to score from it, and the scorer and metric modules are imported only when they run.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError
from .options import AIDOptions, IsolationForestOptions, ITDOptions, KNNOptions, NoOptions, ScorerOptions


@dataclass(frozen=True)
class MetricSpec:
    """An evaluation metric: ``needs`` "features" (a classifier or extractor on image data), "points" (the data
    themselves) or "discriminator" (the trained D)."""

    name: str
    label: str
    higher_is_better: bool
    needs: str


METRIC_SPECS: dict[str, MetricSpec] = {m.name: m for m in (
    MetricSpec("all", "ALL", True, "points"),  # average log-likelihood of held-out points under a KDE of samples
    MetricSpec("is", "IS", True, "features"),  # Inception Score from the classifier's logits
    MetricSpec("log_is", "log IS", True, "features"),
    MetricSpec("fid", "FID", False, "features"),  # Frechet distance of classifier features
    MetricSpec("kid", "KID", False, "features"),  # unbiased polynomial-kernel MMD^2 of classifier features
    MetricSpec("loss_d", "D loss", False, "discriminator"),  # the discriminator loss on held-out data
)}
METRICS = tuple(METRIC_SPECS)
"""The scorable metrics: what influence is computed on and studies score and recommend by."""
FEATURE_METRICS = tuple(m.name for m in METRIC_SPECS.values() if m.needs == "features")
EVALUATION_SPECS: dict[str, MetricSpec] = {m.name: m for m in (
    MetricSpec("precision", "precision", True, "features"),  # generated samples inside the real k-NN manifold
    MetricSpec("recall", "recall", True, "features"),  # real samples inside the generated k-NN manifold
    MetricSpec("density", "density", True, "features"),  # real k-NN balls holding each generated sample, / k
    MetricSpec("coverage", "coverage", True, "features"),  # real k-NN balls holding a generated sample
)}
EVALUATION_METRICS = tuple(EVALUATION_SPECS)
"""Evaluation-only metrics of studies (``[cleanse] evaluate``): what cleansing costs in fidelity and diversity.
Counts without a gradient, so never scored on (``metric_spec`` refuses them) and never recommended by."""
HIGHER_IS_BETTER = {m.name: m.higher_is_better for m in (*METRIC_SPECS.values(), *EVALUATION_SPECS.values())}


def metric_spec(name: str) -> MetricSpec:
    """A scorable metric's spec; an evaluation-only one is refused with the reason."""
    if name in EVALUATION_SPECS:
        raise ConfigError(f"metric {name!r} is evaluation only (list it in [cleanse] evaluate); it cannot be "
                          f"scored on (scorable: {', '.join(METRICS)})")
    if name not in METRIC_SPECS:
        raise ConfigError(f"unknown metric {name!r} (known: {', '.join(METRICS)})")
    return METRIC_SPECS[name]


def evaluated_spec(name: str) -> MetricSpec:
    """The spec of any metric a study reports: a scorable or an evaluation-only one."""
    spec = METRIC_SPECS.get(name) or EVALUATION_SPECS.get(name)
    if spec is None:
        raise ConfigError(f"unknown metric {name!r} (known: {', '.join((*METRICS, *EVALUATION_METRICS))})")
    return spec


def direction(metric: str) -> float:
    """+1 where higher is better, -1 where lower is: harmfulness = direction x influence."""
    return 1.0 if evaluated_spec(metric).higher_is_better else -1.0


FEATURE_SPACES = ("classifier", "inception", "self_supervised", "torchscript")
"""The networks a feature metric sees generated images through (``gancleanse.features``, one module each);
``[metric] features`` picks one, or ``auto``."""
FEATURE_CHOICES = ("auto", *FEATURE_SPACES)
FEATURES = ("raw", *FEATURE_CHOICES)
"""What isolation_forest / knn_density fit on: the raw data, or a feature space."""
SPACE_LABELS = {"classifier": "classifier", "torchscript": "TorchScript extractor",
                "self_supervised": "self-supervised encoder"}


def metric_label(metric: str, space: str | None = None) -> str:
    """How outputs name ``metric`` computed in feature ``space``: FID / KID / IS only in the Inception network of
    the standard; in another network the network is named, and in the self-supervised encoder's features the
    Frechet distance is "FD (self-supervised encoder)", never FID (it is not comparable with published FID)."""
    spec = METRIC_SPECS.get(metric) or EVALUATION_SPECS.get(metric)
    label = spec.label if spec else metric
    if spec is None or spec.needs != "features" or space not in SPACE_LABELS:
        return label
    if space == "self_supervised" and label in ("FID", "KID"):
        label = label.replace("I", "", 1)  # FID -> FD, KID -> KD: no Inception involved
    return f"{label} ({SPACE_LABELS[space]})"


@dataclass(frozen=True)
class ScorerSpec:
    """A scorer: its module under ``gancleanse.influence``, what it ranks with, its options.

    ``uses``: "metric" (one score file per scored metric), "features" (fitted on raw data, and on the metric
    classifier's features for labelled image data) or "nothing".
    """

    name: str
    module: str
    uses: str
    summary: str
    options: type[ScorerOptions] = NoOptions


SCORERS: dict[str, ScorerSpec] = {s.name: s for s in (
    ScorerSpec("itd", "itd", "metric", "influence through the recorded training trajectory", ITDOptions),
    ScorerSpec("aid", "aid", "metric", "influence by implicit differentiation at the trained point", AIDOptions),
    ScorerSpec("isolation_forest", "isolation_forest", "features", "most anomalous first (Isolation Forest)",
               IsolationForestOptions),
    ScorerSpec("knn_density", "knn_density", "features", "lowest density first (distance to the k-th neighbour)",
               KNNOptions),
    ScorerSpec("discriminator", "discriminator", "nothing", "least real to the trained discriminator first"),
    ScorerSpec("random", "random_order", "nothing", "a seeded random order"),
)}
METHODS = tuple(SCORERS)


def scorer_spec(method: str) -> ScorerSpec:
    if method not in SCORERS:
        raise ConfigError(f"unknown method {method!r} (available: {', '.join(METHODS)})")
    return SCORERS[method]


DEFAULT_CHECK = 32  # trust-check retrains per scoring: the default of the CLI, the API and the config
