"""Every scorer's options as one frozen dataclass, validated when it is built.

The dataclass is the single source of a scorer's options: the CLI derives its flags from the fields (``flag``), a study
reads them from the ``[cleanse.<scorer>]`` table, and the API takes them as keywords or as the dataclass itself. Errors
name the option (``aid.tol``) and its flag, wherever the value came from. A leaf module (``errors`` and ``validation``
only), so the config can validate study tables without importing the scorers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from .errors import ConfigError
from .validation import checked, setting


@dataclass(frozen=True)
class ScorerOptions:
    """Base of the options dataclasses; ``scorer`` names the options in messages (``aid.tol``)."""

    scorer: ClassVar[str] = ""
    flag_prefix: ClassVar[str] = ""  # "aid-": the flags are --aid-solver, --aid-tol, ...

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = checked(f, getattr(self, f.name), f"{self.scorer}.{f.name}", f" ({self.flag(f.name)})")
            object.__setattr__(self, f.name, value)
        self.check_combination()

    def check_combination(self) -> None:
        """Rules between fields (subclasses)."""

    @classmethod
    def flag(cls, name: str) -> str:
        return "--" + cls.flag_prefix + name.replace("_", "-")

    @classmethod
    def from_mapping(cls, values: "Mapping[str, Any] | ScorerOptions | None",
                     scorer: str | None = None) -> "ScorerOptions":
        """Options from keywords or a config table; an unknown name is an error listing the known ones (``scorer``: the
        name in messages, for option classes shared by several scorers)."""
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


REVERSE_PASSES = ("auto", "vjp", "hvp")


@dataclass(frozen=True)
class ITDOptions(ScorerOptions):
    scorer: ClassVar[str] = "itd"

    relu_smoothing: float | None = setting(
        None, lo=0.0, lo_open=True, must="a positive number", metavar="T",
        doc="differentiate ReLU kinks as if smoothed over a width T (the training is unchanged); try 0.2 x "
            "the typical |pre-activation| when 5 or more epochs are traced")
    memory_gb: float | None = setting(
        None, lo=0.0, lo_open=True, must="a positive number of gigabytes", metavar="GB",
        doc="memory for the reverse pass's graphs (default: half of what is available); a smaller budget "
            "replays each checkpoint segment once more, same result")
    reverse: str = setting(
        "auto", choices=REVERSE_PASSES, noun="reverse pass",
        doc="how each step is differentiated: vjp (the VJP of the whole step, holding its graph), hvp (a "
            "forward-over-reverse Hessian-vector product per player, keeping states instead of graphs: less "
            "memory) or auto (vjp on CPU, where it was faster on every bench; on CUDA, times both on the first "
            "reverse step and keeps the faster); the influence agrees to rounding")


AID_SOLVERS = ("gmres", "cg", "neumann")


@dataclass(frozen=True)
class AIDOptions(ScorerOptions):
    scorer: ClassVar[str] = "aid"
    flag_prefix: ClassVar[str] = "aid-"

    solver: str = setting("gmres", choices=AID_SOLVERS, noun="AID solver", doc="adjoint solver")
    iterations: int | None = setting(None, lo=1, must="at least 1",
                                    doc="Krylov vectors / CG steps / series terms (default 100 / 200 / 1000)")
    step: float | None = setting(None, lo=0.0, lo_open=True, must="a positive finite number",
                                doc="neumann: step size s (default: from the operator's spectral norm)")
    damping: float | None = setting(None, lo=0.0, must="a finite number >= 0", metavar="LAMBDA",
                                   doc="solve (J + lambda I)^T v = grad V; default: damped on the recorded window's "
                                       "time scale in the training's step sizes; 0: the undamped equilibrium")
    tol: float = setting(1e-6, lo=0.0, lo_open=True, must="a positive finite number", doc="relative residual to reach")
    batch_size: int | None = setting(None, lo=1, must="at least 1",
                                    doc="neumann: fresh minibatches of this many instances and latents per iteration")
    operator_size: int | None = setting(None, lo=1, must="at least 1",
                                       doc="training instances (and latents) of the fixed Jacobian operator (default "
                                           "all, up to 2048); each iteration costs a double backward over them")

    def check_combination(self) -> None:
        if self.batch_size is not None and self.solver != "neumann":
            raise ConfigError(f"aid.batch_size ({self.flag('batch_size')}, fresh minibatches) applies to "
                              "solver neumann only")


@dataclass(frozen=True)
class KNNOptions(ScorerOptions):
    scorer: ClassVar[str] = "knn_density"

    neighbors: int = setting(5, lo=1, must="at least 1", metavar="K",
                            doc="rank by the distance to the K-th nearest other instance")


@dataclass(frozen=True)
class IsolationForestOptions(ScorerOptions):
    scorer: ClassVar[str] = "isolation_forest"

    estimators: int = setting(100, lo=1, must="at least 1", metavar="N", doc="trees of the forest")


@dataclass(frozen=True)
class NoOptions(ScorerOptions):
    """Scorers without options (discriminator, random)."""
