"""GAN evaluation metrics, each a differentiable function of the training state.

``make_metric(name, run, split)`` binds a metric to a run's fixed evaluation latents and real split, returning
a ``Metric``: its value, and its gradient with respect to the training state that ITD and AID start from. Each
name has one builder in ``BUILDERS``; what a metric is (label, direction, what it needs) lives in ``gancleanse.specs``.

``is``, ``log_is``, ``fid`` and ``kid`` see generated images through the frozen network of the run's feature
space (``gancleanse.features``: the trained classifier, Inception-v3, the self-supervised encoder or a
TorchScript file), and so do ``precision``, ``recall``, ``density`` and ``coverage`` (``manifold``): these are
evaluation only (``gancleanse.specs.EVALUATION_METRICS``), counts whose ``value`` studies report; they have no
gradient and are never scored on. ``values(metrics, state)`` evaluates several at once: those of one network on
one split's generated samples read one forward pass (bit for bit the numbers of one pass each).

Memory: a metric is V(state) = S(Y) + R(state), with Y the stacked per-sample outputs (features, logits, samples or
discriminator logits) of the generated samples and S a statistic of all rows. ``Metric.value`` and
``Metric.gradient`` take the generated samples ``chunk_size`` at a time: Y without a graph, dS/dY on Y as a
leaf (small: n x d), then one VJP per chunk through extractor and generator, summed. Only one chunk's graph is
alive at once, so memory does not grow with ``metric.n_samples``; ``Metric.fn`` is the same V in one
differentiable full batch (the reference the chunked path is tested against).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import torch
from torch.func import grad, vjp
from torch.utils._pytree import tree_leaves

from ..errors import ConfigError, NonFiniteError
from ..specs import EVALUATION_METRICS
from .all_kde import average_log_likelihood

if TYPE_CHECKING:
    from ..run import Run
    from ..training.dynamics import Dynamics, State
    from ..features import FeatureModel


DEFAULT_CHUNK_SIZE = 256  # generated samples whose graph is held at once (the default of [metric] chunk_size)
Rows = Callable[["State", slice], torch.Tensor]


@dataclass(frozen=True)
class SharedOutputs:
    """Where a metric's Y comes from when other metrics read the same pass: ``produce(state, rows)`` gives every
    output of one network on the generated samples ``rows`` (features and logits), Y is its ``index``-th.
    Metrics of one ``key`` (network, split, samples) share that pass in ``values``."""

    key: tuple
    produce: Callable[["State", slice], tuple[torch.Tensor, ...]]
    index: int


@dataclass(frozen=True)
class Metric:
    """V(state) = statistic(Y) + rest(state), Y = ``outputs(state, rows)`` stacked over the generated samples
    (its direction: ``gancleanse.specs``); ``statistic_gradient``: dS/dY in closed form (default: autograd);
    ``shared``: how ``values`` computes Y together with other metrics' (None: on its own)."""

    name: str
    split: str
    outputs: Rows
    n_samples: int
    statistic: Callable[[torch.Tensor], torch.Tensor]
    chunk_size: int = DEFAULT_CHUNK_SIZE
    statistic_gradient: Callable[[torch.Tensor], torch.Tensor] | None = None
    rest: Callable[["State"], torch.Tensor] | None = None
    shared: SharedOutputs | None = None

    def fn(self, state: "State") -> torch.Tensor:
        """V in one differentiable full batch (memory grows with the sample count: the reference path)."""
        v = self.statistic(self.outputs(state, slice(None)))
        return v if self.rest is None else v + self.rest(state)

    __call__ = fn

    def _chunks(self) -> list[slice]:
        return [slice(i, i + self.chunk_size) for i in range(0, self.n_samples, self.chunk_size)]

    def _all_outputs(self, state: "State") -> torch.Tensor:
        """Y, written chunk by chunk into one buffer."""
        return _stacked(lambda rows: (self.outputs(state, rows),), self._chunks(), self.n_samples)[0]

    def value(self, state: "State") -> float:
        """The metric as a number, in chunks without a graph; NaN or infinity is an error, never a result."""
        return self._value_of(self._all_outputs(state), state)

    @torch.no_grad()
    def _value_of(self, y: torch.Tensor, state: "State") -> float:
        v = self.statistic(y)
        v = float(v if self.rest is None else v + self.rest(state))
        if not math.isfinite(v):
            raise NonFiniteError(f"metric {self.name} on the {self.split} split evaluated to {v}")
        return v

    def gradient(self, state: "State") -> "State":
        """dV/d(state), a tree shaped like the state (zero where V does not depend on it), one chunk's
        graph at a time."""
        return self.value_and_gradient(state)[1]

    def value_and_gradient(self, state: "State") -> tuple[float, "State"]:
        """``value`` and ``gradient`` from one pass of the generator over the samples (not one pass each)."""
        y = self._all_outputs(state)
        value = self._value_of(y, state)
        if self.statistic_gradient is not None:
            dy = self.statistic_gradient(y)
        else:
            leaf = y.requires_grad_(True)
            with torch.enable_grad():
                (dy,) = torch.autograd.grad(self.statistic(leaf), leaf)
        total = grad(self.rest)(state) if self.rest is not None else None
        for rows in self._chunks():
            (part,) = vjp(lambda s: self.outputs(s, rows), state)[1](dy[rows].to(y.dtype))
            if total is None:
                total = part
            else:  # in place, for the same reason as in _all_outputs
                for acc, add in zip(tree_leaves(total), tree_leaves(part)):
                    acc.add_(add)
        return value, total


@torch.no_grad()
def _stacked(outputs: Callable[[slice], tuple[torch.Tensor, ...]], chunks: list[slice], n: int
             ) -> list[torch.Tensor]:
    """Each of ``outputs``' tensors over all rows, written chunk by chunk into one buffer each: keeping each
    chunk's output instead interleaves small live blocks with the freed graphs, and the heap then grew by
    17 kB per sample (measured)."""
    first, *rest = chunks
    parts = outputs(first)
    out = [part.new_empty((n, *part.shape[1:])) for part in parts]
    for buffer, part in zip(out, parts):
        buffer[first] = part
    for rows in rest:
        for buffer, part in zip(out, outputs(rows)):
            buffer[rows] = part
    return out


def values(metrics: list[Metric], state: "State") -> list[float]:
    """Each metric's ``value`` at ``state``, those reading the same network's outputs on the same generated
    samples (FID and IS on one split, say) from one pass: the same numbers, bit for bit, at a fraction of the
    cost (generating the samples and the network's forward pass dominate)."""
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(metrics):
        key = ("own", i) if m.shared is None else (*m.shared.key, m.n_samples, m.chunk_size)
        groups.setdefault(key, []).append(i)
    out: list[float] = [math.nan] * len(metrics)
    for members in groups.values():
        first = metrics[members[0]]
        if first.shared is None or len(members) == 1:
            out[members[0]] = first.value(state)
            continue
        produce = first.shared.produce
        ys = _stacked(lambda rows: produce(state, rows), first._chunks(), first.n_samples)
        for i in members:
            out[i] = metrics[i]._value_of(ys[metrics[i].shared.index], state)  # type: ignore[union-attr]
    return out


@dataclass(frozen=True)
class MetricInputs:
    """What a metric is bound to: the run, the split's reals and the split's fixed latents and labels."""

    name: str
    run: "Run"
    split: str
    real: torch.Tensor
    z: torch.Tensor
    c: torch.Tensor | None
    dynamics: "Dynamics"
    chunk_size: int

    def generate(self, state: "State", rows: slice = slice(None)) -> torch.Tensor:
        """The generated samples ``rows`` the metric sees (the generator average when there is one)."""
        c = None if self.c is None else self.c[rows]
        return self.dynamics.models.generate(self.dynamics.eval_generator(state), self.z[rows], c)

    def metric(self, outputs: Rows, statistic: Callable[[torch.Tensor], torch.Tensor], **parts: Any) -> Metric:
        return Metric(self.name, self.split, outputs, self.z.shape[0], statistic, self.chunk_size, **parts)

    def network_metric(self, model: "FeatureModel", index: int, statistic: Callable[[torch.Tensor], torch.Tensor],
                       **parts: Any) -> Metric:
        """A metric of the ``index``-th output of ``model`` (0 features, 1 logits) on the generated samples,
        sharing that pass in ``values`` with the other metrics of the same network and samples."""
        def produce(state: "State", rows: slice) -> tuple[torch.Tensor, ...]:
            return model(self.generate(state, rows))

        shared = SharedOutputs((model.key, id(self.run), self.split), produce, index)
        return self.metric(lambda state, rows: model(self.generate(state, rows))[index], statistic, shared=shared,
                           **parts)


def make_metric(name: str, run: "Run", split: str = "valid", chunk_size: int | None = None) -> Metric:
    """The metric ``name`` on ``split`` ("valid" or "test") of ``run``'s data; ``chunk_size``: generated samples
    per chunk of ``Metric.value`` and ``Metric.gradient`` (default the run's ``[metric] chunk_size``; the result
    depends on it only by round-off)."""
    builder = BUILDERS.get(name)
    if builder is None:
        raise ConfigError(f"unknown metric {name!r} (known: {', '.join(BUILDERS)})")
    chunk_size = run.cfg.metric.chunk_size if chunk_size is None else chunk_size
    if int(chunk_size) < 1:
        raise ConfigError(f"metric chunk size must be at least 1, got {chunk_size}")
    return builder(MetricInputs(name, run, split, run.real(split), run.eval_latents(split), run.eval_labels(split),
                                run.dynamics, int(chunk_size)))


def _all(inputs: MetricInputs) -> Metric:
    bandwidth = inputs.run.cfg.metric.bandwidth
    return inputs.metric(inputs.generate, lambda samples: average_log_likelihood(inputs.real, samples, bandwidth))


def _loss_d(inputs: MetricInputs) -> Metric:
    from .loss_d import fake_term, real_term_and_decay

    dyn, x, y = inputs.dynamics, inputs.real.to(inputs.run.dtype), inputs.run.labels(inputs.split)

    def fake_logits(state: "State", rows: slice) -> torch.Tensor:
        return dyn.models.discriminate(state["d"], inputs.generate(state, rows), None if inputs.c is None
                                       else inputs.c[rows])

    return inputs.metric(fake_logits, lambda logits: fake_term(dyn, logits),
                         rest=lambda state: real_term_and_decay(dyn, state, x, y))


# Real-split quantities of the classifier metrics, computed once per (run data, split, model).
_REAL_CACHE: dict[tuple, Any] = {}
_REAL_CACHE_SIZE = 8
Cached = TypeVar("Cached")


def _feature_model(inputs: MetricInputs) -> "FeatureModel":
    """The frozen network of the run's feature space (``gancleanse.features``)."""
    from ..features import load_feature_model

    model = load_feature_model(inputs.run)
    if inputs.name in ("is", "log_is") and not model.has_logits:
        raise ConfigError(f"metric {inputs.name!r} needs class logits; the {model.space} feature space has none "
                          "(use fid or kid, or features = inception / classifier)")
    return model


def _cached(inputs: MetricInputs, model: "FeatureModel", what: tuple, compute: Callable[[], Cached]) -> Cached:
    """The real split's quantity ``what`` under ``model``: computed once, then taken from the cache."""
    run = inputs.run
    key = (str(run.path.resolve()), run.meta.get("data_fingerprint"), inputs.split, model.key, str(run.device), *what)
    if key not in _REAL_CACHE:
        if len(_REAL_CACHE) >= _REAL_CACHE_SIZE:
            _REAL_CACHE.pop(next(iter(_REAL_CACHE)))
        _REAL_CACHE[key] = compute()
    return _REAL_CACHE[key]


def _real_features(inputs: MetricInputs, model: "FeatureModel") -> torch.Tensor:
    """The real split's features, evaluated once without a graph and cached."""
    return _cached(inputs, model, ("features",), lambda: model.evaluate(inputs.real, inputs.chunk_size)[0])


def _inception(inputs: MetricInputs) -> Metric:
    from .inception_score import check_splits, inception_score, log_inception_score

    model = _feature_model(inputs)
    score = inception_score if inputs.name == "is" else log_inception_score
    splits = inputs.run.cfg.metric.is_splits
    check_splits(splits, inputs.z.shape[0])
    return inputs.network_metric(model, 1, lambda logits: score(logits, splits))


def _fid(inputs: MetricInputs) -> Metric:
    from .fid import fid_reference, frechet_distance

    model = _feature_model(inputs)
    ridge, n = inputs.run.cfg.metric.fid_ridge, inputs.z.shape[0]
    ref = _cached(inputs, model, ("fid", ridge, n), lambda: fid_reference(_real_features(inputs, model), ridge, n))
    return inputs.network_metric(model, 0, lambda features: frechet_distance(ref, features))


def _kid(inputs: MetricInputs) -> Metric:
    from .kid import kernel_inception_distance, kid_gradient, real_kernel_mean

    model = _feature_model(inputs)
    degree, chunk = inputs.run.cfg.metric.kid_degree, inputs.chunk_size
    real = _real_features(inputs, model)
    real_term = _cached(inputs, model, ("kid", degree), lambda: real_kernel_mean(real, degree))
    return inputs.network_metric(model, 0,
                                 lambda features: kernel_inception_distance(real, features, degree, real_term, chunk),
                                 statistic_gradient=lambda features: kid_gradient(real, features, degree, chunk))


def _manifold(inputs: MetricInputs) -> Metric:
    """precision, recall, density or coverage (``manifold``): evaluation only, their value without a gradient."""
    from .manifold import K_SETTINGS, manifold_statistic, real_manifold

    model = _feature_model(inputs)
    k = getattr(inputs.run.cfg.metric, K_SETTINGS[inputs.name])
    reference = _cached(inputs, model, ("manifold", k),
                        lambda: real_manifold(_real_features(inputs, model), k, inputs.chunk_size))
    return inputs.network_metric(model, 0, manifold_statistic(inputs.name, reference, inputs.chunk_size))


BUILDERS: dict[str, Callable[[MetricInputs], Metric]] = {
    "all": _all, "is": _inception, "log_is": _inception, "fid": _fid, "kid": _kid, "loss_d": _loss_d,
    **dict.fromkeys(EVALUATION_METRICS, _manifold)}
