"""Every scorer's options as one frozen dataclass, validated when it is built.

The dataclass is the single source of a scorer's options: the CLI derives its flags from
the fields (``flag``), a study reads them from the ``[cleanse.<scorer>]`` table, and the
API takes them as keywords or as the dataclass itself. Errors name the option (``aid.tol``)
and its flag, wherever the value came from.

A leaf module (it imports only ``errors``), so the config can validate study tables
without importing the scorers.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from .errors import ConfigError


def option(default: Any, *, doc: str, lo: float | None = None, lo_open: bool = False,
           choices: tuple | None = None, must: str | None = None, metavar: str | None = None) -> Any:
    """A field with what validation and the CLI need: range or choices, and help text."""
    return field(default=default, metadata={"doc": doc, "lo": lo, "lo_open": lo_open, "choices": choices,
                                            "must": must, "metavar": metavar})


@dataclass(frozen=True)
class ScorerOptions:
    """Base of the options dataclasses; ``scorer`` names the options in messages (``aid.tol``)."""

    scorer: ClassVar[str] = ""
    flag_prefix: ClassVar[str] = ""  # "aid-": the flags are --aid-solver, --aid-tol, ...

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, self._checked(f, getattr(self, f.name)))
        self.check_combination()

    def check_combination(self) -> None:
        """Rules between fields (subclasses)."""

    @classmethod
    def flag(cls, name: str) -> str:
        return "--" + cls.flag_prefix + name.replace("_", "-")

    @classmethod
    def from_mapping(cls, values: "Mapping[str, Any] | ScorerOptions | None",
                     scorer: str | None = None) -> "ScorerOptions":
        """Options from keywords or a config table; an unknown name is an error listing the known
        ones (``scorer``: the name in messages, for option classes shared by several scorers)."""
        scorer = scorer or cls.scorer
        if isinstance(values, cls):
            return values
        if isinstance(values, ScorerOptions):
            raise ConfigError(f"{type(values).__name__} given where {scorer} options are expected")
        values = dict(values or {})
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown and not known:
            raise ConfigError(f"{scorer} takes no options (got {', '.join(unknown)})")
        if unknown:
            raise ConfigError(f"{scorer} has no option {', '.join(unknown)} (known: {', '.join(known)})")
        return cls(**values)

    def given(self) -> dict[str, Any]:
        """The options that differ from their defaults (what a record needs to reproduce a score)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) != f.default}

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def _checked(self, f: dataclasses.Field, value: Any) -> Any:
        meta, name = f.metadata, f"{self.scorer}.{f.name}"
        where = f" ({self.flag(f.name)})"
        if value is None:
            if f.default is None:
                return None
            raise ConfigError(f"{name} must not be empty{where}")
        kind = type(f.default) if f.default is not None else _declared(f)
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        else:
            ok = isinstance(value, kind)
        if not ok:
            raise ConfigError(f"{name} must be {kind.__name__}, got {type(value).__name__} {value!r}{where}")
        if meta["choices"] and value not in meta["choices"]:
            raise ConfigError(f"unknown {self.scorer.upper()} {f.name} {value!r} (available: "
                              f"{', '.join(meta['choices'])}){where}")
        lo = meta["lo"]
        bad = kind is float and not math.isfinite(value)
        if lo is not None:
            bad = bad or value < lo or (meta["lo_open"] and value == lo)
        if bad:
            rule = meta["must"] or (f"{'>' if meta['lo_open'] else '>='} {lo}" if lo is not None else "finite")
            raise ConfigError(f"{name} must be {rule}, got {value!r}{where}")
        return value


def _declared(f: dataclasses.Field) -> type:
    """The non-None type of a field whose default is None (``int | None`` -> int)."""
    text = str(f.type).replace(" | None", "").replace("None | ", "")
    return {"int": int, "float": float, "str": str, "bool": bool}[text]


@dataclass(frozen=True)
class ITDOptions(ScorerOptions):
    scorer: ClassVar[str] = "itd"

    relu_smoothing: float | None = option(
        None, lo=0.0, lo_open=True, must="a positive number", metavar="T",
        doc="differentiate ReLU kinks as if smoothed over a width T (the training is unchanged); try 0.2 x "
            "the typical |pre-activation| when 5 or more epochs are traced")
    memory_gb: float | None = option(
        None, lo=0.0, lo_open=True, must="a positive number of gigabytes", metavar="GB",
        doc="memory for the reverse pass's graphs (default: half of what is available); a smaller budget "
            "replays each checkpoint segment once more, same result")


AID_SOLVERS = ("gmres", "cg", "neumann")


@dataclass(frozen=True)
class AIDOptions(ScorerOptions):
    scorer: ClassVar[str] = "aid"
    flag_prefix: ClassVar[str] = "aid-"

    solver: str = option("gmres", choices=AID_SOLVERS, doc="adjoint solver")
    iterations: int | None = option(None, lo=1, must="at least 1",
                                    doc="Krylov vectors / CG steps / series terms (default 100 / 200 / 1000)")
    step: float | None = option(None, lo=0.0, lo_open=True, must="a positive finite number",
                                doc="neumann: step size s (default: from the operator's spectral norm)")
    damping: float | None = option(None, lo=0.0, must="a finite number >= 0", metavar="LAMBDA",
                                   doc="solve (J + lambda I)^T v = grad V; default: damped on the recorded "
                                       "window's time scale in the training's step sizes; 0: the undamped "
                                       "equilibrium")
    tol: float = option(1e-6, lo=0.0, lo_open=True, must="a positive finite number",
                        doc="relative residual to reach")
    batch_size: int | None = option(None, lo=1, must="at least 1",
                                    doc="neumann: fresh minibatches of this many instances and latents per iteration")
    operator_size: int | None = option(None, lo=1, must="at least 1",
                                       doc="training instances (and latents) of the fixed Jacobian operator "
                                           "(default all, up to 2048); each iteration costs a double backward "
                                           "over them")

    def check_combination(self) -> None:
        if self.batch_size is not None and self.solver != "neumann":
            raise ConfigError(f"aid.batch_size ({self.flag('batch_size')}, fresh minibatches) applies to "
                              "solver neumann only")


@dataclass(frozen=True)
class KNNOptions(ScorerOptions):
    scorer: ClassVar[str] = "knn_density"

    neighbors: int = option(5, lo=1, must="at least 1", metavar="K",
                            doc="rank by the distance to the K-th nearest other instance")


@dataclass(frozen=True)
class IsolationForestOptions(ScorerOptions):
    scorer: ClassVar[str] = "isolation_forest"

    estimators: int = option(100, lo=1, must="at least 1", metavar="N", doc="trees of the forest")


@dataclass(frozen=True)
class NoOptions(ScorerOptions):
    """Scorers without options (discriminator, random)."""
