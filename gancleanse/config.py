"""Run configuration: one dataclass per TOML section, validated with errors that name the key.

Every key has a default, so an empty file is a valid config (the paper's 2D setting). ``Config.resolved`` fills the
defaults that depend on other keys, so that the copy saved in a run directory is explicit.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import ConfigError, GancleanseWarning
from .options import AIDOptions, IsolationForestOptions, ITDOptions, KNNOptions, ScorerOptions
from .specs import DEFAULT_CHECK, EVALUATION_METRICS, FEATURE_CHOICES, METHODS, METRICS
from .toml_writer import dump_toml
from .validation import INT64, checked, setting

CONFIG_MAX_BYTES = 16 * 2**20  # a config is a few kB: never read a huge file as one
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")

GAUSSIAN2D_N_TRAIN = 10000  # the paper's accuracy setting
REPLICATE_SEEDS = 2**32  # added to the base seeds (< 2**63), so every sum fits torch.Generator.manual_seed (< 2**64)
MAX_THREADS = 1024  # a static sanity bound (torch.set_num_threads(100000) crashes); see device.check_threads
# Static bounds of the keys that decide an allocation, far beyond any machine's memory for the arrays they size; what
# the memory available cannot hold is refused where it would be allocated (integrity.check_fits), naming the key.
MAX_INSTANCES = 10**9  # split sizes, batch size, generated samples
MAX_WIDTH = 2**24  # latent dimension, hidden units or channels, adapter rank
MAX_LAYERS = 1024


@dataclass
class DataConfig:
    name: str = setting("gaussian2d", choices=("gaussian2d", "digits", "mnist", "npz", "images", "custom"),
                        doc="images: folder, StyleGAN-style zip or .npy/.npz; custom: tensors given to the Python API")
    path: str | None = setting(None, doc="images: folder, .zip, .npy or .npz; mnist: IDX directory or .npz; npz: file")
    reference_path: str | None = setting(None, doc="images: a curated dataset the validation and test splits "
                                         "come from (then the training split is all of path)")
    image_size: int | None = setting(None, lo=4, hi=4096, doc="resize to this side (short side, then centre crop)")
    channels: int | None = setting(None, choices=(1, 3), doc="images: 1 or 3 (default: 1 if every image is gray)")
    labels: str = setting("auto", choices=("auto", "folders", "none"),
                          doc="images: auto = dataset.json or the npz's y if present; folders = first-level subfolders")
    resample: str = setting("lanczos", choices=("lanczos", "bicubic", "bilinear", "box", "hamming", "nearest"),
                            doc="images: filter of the resize to image_size")
    skip_bad_files: bool = setting(False, doc="images: skip (and report) unreadable files instead of failing")
    n_train: int | None = setting(None, lo=1, hi=MAX_INSTANCES, doc="default: 10000 for gaussian2d, else every "
                                  "instance not in the validation or test split")
    n_valid: int = setting(1000, lo=1, hi=MAX_INSTANCES)
    n_test: int = setting(1000, lo=1, hi=MAX_INSTANCES)
    seed: int = setting(0, lo=0)


@dataclass
class ModelConfig:
    arch: str = setting("mlp", choices=("mlp", "dcgan", "custom"), doc="custom: modules given to the Python API")
    z_dim: int = setting(10, lo=1, hi=MAX_WIDTH)
    g_hidden: int = setting(32, lo=1, hi=MAX_WIDTH, doc="mlp: hidden units; dcgan: channels")
    d_hidden: int = setting(64, lo=1, hi=MAX_WIDTH, doc="mlp: hidden units; dcgan: channels")
    layers: int = setting(2, lo=1, hi=MAX_LAYERS, doc="hidden layers per network (mlp)")
    activation: str = setting("relu", choices=("relu", "elu", "softplus", "sigmoid", "leaky_relu", "tanh"))
    norm: str = setting("none", choices=("none", "layer"))
    bias: bool = setting(False)
    dtype: str = setting("float64", choices=("float32", "float64"))
    train_only: list[str] | None = setting(None, doc="globs of the parameters that train, named d/<name> and "
                                           "g/<name> (default: all; only the adapters of a module with LoRA)")
    frozen: list[str] = setting([], doc="globs of parameters kept constant (after train_only)")
    lora_rank: int = setting(0, lo=0, hi=MAX_WIDTH, doc="low-rank adapters of this rank on the built-in mlp/dcgan's "
                             "linear and conv layers (0 = off); only the adapters train unless train_only says "
                             "otherwise")
    lora_targets: list[str] | None = setting(None, doc="globs of the layer names to adapt (default: all)")
    init: str | None = setting(None, doc="safetensors file of starting weights: generator.<name>, discriminator.<name>")
    init_g: str | None = setting(None, doc="safetensors state dict of the generator's starting weights")
    init_d: str | None = setting(None, doc="safetensors state dict of the discriminator's starting weights")
    conditional: bool = setting(False, doc="class-conditional G(z, y) and D(x, y) on the data's labels: the "
                                "built-in nets embed y into G's input and project it in D; generated labels "
                                "follow the training labels' frequencies")


@dataclass
class TrainConfig:
    epochs: int = setting(50, lo=1)
    batch_size: int = setting(100, lo=1, hi=MAX_INSTANCES)
    optimizer: str = setting("sgd", choices=("sgd", "momentum", "adam"))
    lr_d: float = setting(1e-3, lo=0.0, lo_open=True)
    lr_g: float = setting(1e-3, lo=0.0, lo_open=True)
    momentum: float = setting(0.9, lo=0.0, hi=1.0)
    betas: list[float] = setting([0.5, 0.999])
    eps: float = setting(1e-8, lo=0.0)
    update: str = setting("simultaneous", choices=("simultaneous", "alternating"))
    loss: str = setting("modified_minmax", choices=("modified_minmax", "minmax", "wasserstein", "hinge", "ls"))
    weight_decay_d: float = setting(0.0, lo=0.0)
    weight_decay_g: float = setting(0.0, lo=0.0)
    r1_gamma: float = setting(0.0, lo=0.0, doc="R1 penalty (gamma/2) mean_i w_i ||grad_x D(x_i)||^2 on real "
                              "instances, each weighted like its loss term (0 = off)")
    r2_gamma: float = setting(0.0, lo=0.0, doc="R2: the same penalty on generated samples (0 = off)")
    r1_every: int = setting(1, lo=1, doc="lazy regularization: both penalties every k steps, scaled by k")
    ema_beta: float = setting(0.0, lo=0.0, hi=1, hi_open=True, doc="0 = no generator averaging "
                              "(1 would freeze the average at the initial generator)")
    seed: int = setting(0, lo=0)
    record_from_epoch: int | None = setting(None, lo=0, doc="first epoch of the recorded window")
    checkpoint_every: int | None = setting(None, lo=1, doc="steps between replay checkpoints in the window "
                                           "(default: every step while the window's states take at most 2 GB, "
                                           "so ITD differentiates one step at a time and never replays twice; "
                                           "else the fewest steps apart that fit, at most 25; 25 for states "
                                           "under 256 KB)")
    resume_every: int | None = setting(None, lo=1, doc="steps between resume checkpoints kept while training "
                                       "(default: every epoch, or about every 10 minutes of work, whichever comes "
                                       "first); an interrupted train resumes from the last one")
    device: str = setting("auto", doc="auto (CUDA when available), cpu, cuda or cuda:N; every command's "
                          "--device overrides it")
    threads: int = setting(1, lo=1, hi=MAX_THREADS, doc="torch CPU threads for training and every replay "
                           "of the run; 1 keeps parallel retrains from oversubscribing cores")


@dataclass
class MetricConfig:
    n_samples: int | None = setting(None, lo=1, hi=MAX_INSTANCES, doc="generated samples per evaluation (default "
                                    "n_valid)")
    bandwidth: float = setting(1.0, lo=0.0, lo_open=True)
    seed: int | None = setting(None, lo=0, doc="seed of the fixed evaluation latents (default train.seed)")
    features: str = setting("auto", choices=FEATURE_CHOICES, doc="the network is/fid/kid see images through: "
                            "auto = torchscript when metric.extractor is set, else classifier for labelled images, "
                            "else inception when its weights are found, else self_supervised")
    weights: str | None = setting(None, doc="Inception-v3 weights (the published state dict, .pth or .safetensors); "
                                  "default: the torch hub checkpoint cache under either published file name")
    extractor: str | None = setting(None, doc="TorchScript classifier/feature extractor file (features = torchscript)")
    is_splits: int = setting(1, lo=1)
    kid_degree: int = setting(3, lo=1)
    fid_ridge: float = setting(1e-6, lo=0.0)
    classifier_epochs: int = setting(80, lo=1, doc="Adam epochs of the is/fid/kid classifier")
    classifier_lr: float = setting(1e-2, lo=0.0, lo_open=True)
    classifier_batch_size: int = setting(128, lo=1)
    encoder_epochs: int = setting(30, lo=1, doc="epochs of the self-supervised encoder (features = self_supervised)")
    encoder_lr: float = setting(1e-3, lo=0.0, lo_open=True)
    encoder_batch_size: int = setting(256, lo=2)
    encoder_temperature: float = setting(0.5, lo=0.0, lo_open=True, doc="contrastive (NT-Xent) temperature")
    precision_recall_k: int = setting(3, lo=1, doc="k of the k-NN manifolds of precision and recall")
    density_coverage_k: int = setting(5, lo=1, doc="k of the k-NN balls of density and coverage")
    chunk_size: int = setting(256, lo=1, hi=MAX_INSTANCES, doc="generated samples whose graphs metrics hold at once: "
                              "memory does not grow with n_samples; values change only by round-off")


@dataclass
class CleanseConfig:
    metrics: list[str] = setting(["all"])
    methods: list[str] = setting(["itd", "random"])
    removal_rates: list[float] = setting([0.0, 0.01, 0.05, 0.1], lo=0.0, hi=1, hi_open=True)
    seeds: list[int] = setting([0, 1, 2], lo=0, hi=REPLICATE_SEEDS, hi_open=True,
                               doc="one replicate per seed, added to data.seed, train.seed and metric.seed")
    evaluate: list[str] = setting([], doc="evaluation-only metrics of the retrained "
                                  "GANs (not scored): precision, recall, density, coverage in the metric's features")
    retrain: str = setting("window", choices=("window", "full"))
    check: int = setting(DEFAULT_CHECK, lo=0, hi=INT64, hi_open=True,
                         doc="trust check per seed and scorer: retrains without this many instances (at most the "
                             "training size; 0: off), Kendall tau and Pearson against the actual changes")
    # One table per scorer with options: [cleanse.itd], [cleanse.aid], ... (gancleanse.options)
    itd: ITDOptions = field(default_factory=ITDOptions)
    aid: AIDOptions = field(default_factory=AIDOptions)
    isolation_forest: IsolationForestOptions = field(default_factory=IsolationForestOptions)
    knn_density: KNNOptions = field(default_factory=KNNOptions)

    def scorer_options(self, method: str) -> dict[str, Any]:
        """The study's options of ``method`` that differ from the scorer's defaults."""
        options = getattr(self, method, None)
        return options.given() if isinstance(options, ScorerOptions) else {}


class ConfigDeprecationWarning(GancleanseWarning, DeprecationWarning):
    """A config key that is still read but will not be in a later release."""


# Flat [cleanse] keys of earlier releases -> (scorer table, option): still read, with a warning.
LEGACY_CLEANSE_KEYS = {
    "itd_memory_gb": ("itd", "memory_gb"), "itd_relu_smoothing": ("itd", "relu_smoothing"),
    "aid_solver": ("aid", "solver"), "aid_iterations": ("aid", "iterations"),
    "aid_operator_size": ("aid", "operator_size"), "aid_damping": ("aid", "damping"),
}


def _move_legacy_keys(raw: dict[str, Any], source: str) -> tuple[dict[str, Any], list[str]]:
    """``raw`` with the flat legacy [cleanse] keys moved into their scorer tables, and those keys."""
    cleanse = raw.get("cleanse")
    if not isinstance(cleanse, dict) or not LEGACY_CLEANSE_KEYS.keys() & cleanse.keys():
        return raw, []
    cleanse = dict(cleanse)
    used = [k for k in LEGACY_CLEANSE_KEYS if k in cleanse]
    for key in used:
        table, name = LEGACY_CLEANSE_KEYS[key]
        sub = cleanse.get(table, {})
        if not isinstance(sub, dict):
            raise ConfigError(f"{source}: [cleanse.{table}] must be a table, got {type(sub).__name__}")
        if name in sub:
            raise ConfigError(f"{source}: cleanse.{key} and cleanse.{table}.{name} both given; keep the second")
        cleanse[table] = {**sub, name: cleanse.pop(key)}
    return {**raw, "cleanse": cleanse}, used


SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig,
                             "metric": MetricConfig, "cleanse": CleanseConfig}


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    metric: MetricConfig = field(default_factory=MetricConfig)
    cleanse: CleanseConfig = field(default_factory=CleanseConfig)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<config>") -> "Config":
        """Validate a nested dict (as read from TOML); raise ConfigError naming the key.

        Legacy flat keys (``LEGACY_CLEANSE_KEYS``) are read into their tables; ``load_config`` warns about them, a run
        directory's stored config is read silently.
        """
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: a config must be a table of sections")
        raw, legacy = _move_legacy_keys(raw, source)
        sections = {}
        for name, value in raw.items():
            if name not in SECTIONS:
                raise ConfigError(f"{source}: unknown section [{name}] (known: {', '.join(SECTIONS)})")
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: [{name}] must be a table, got {type(value).__name__}")
            sections[name] = _build_section(SECTIONS[name], value, name, source)
        cfg = cls(**sections)
        cfg._check_cross(source, legacy)
        return cfg

    def validate(self, source: str = "<config>") -> "Config":
        """Check every field and every rule between fields (a config built or changed in Python gets the same checks as
        one read from TOML); returns the config."""
        for name, section_cls in SECTIONS.items():
            section = getattr(self, name)
            if not isinstance(section, section_cls):
                raise ConfigError(f"{source}: [{name}] must be a {section_cls.__name__}")
            for f in dataclasses.fields(section_cls):
                value = getattr(section, f.name)
                if not isinstance(value, ScorerOptions):
                    checked(f, value, f"{source}: {name}.{f.name}")
        self._check_cross(source)
        return self

    def _check_cross(self, source: str, legacy: list[str] | tuple[str, ...] = ()) -> None:
        t, m = self.train, self.model
        if t.record_from_epoch is not None and t.record_from_epoch >= t.epochs:
            raise ConfigError(f"{source}: train.record_from_epoch = {t.record_from_epoch} must be "
                              f"smaller than train.epochs = {t.epochs}")
        if m.init and (m.init_g or m.init_d):
            raise ConfigError(f"{source}: model.init names both players' weights: drop model.init_g / model.init_d")
        if (self.cleanse.itd.relu_smoothing is not None and m.arch != "custom"
                and m.activation not in ("relu", "leaky_relu")):
            key = "itd_relu_smoothing" if "itd_relu_smoothing" in legacy else "itd.relu_smoothing"
            raise ConfigError(f"{source}: cleanse.{key} smooths ReLU kinks, but model.activation = {m.activation!r}")
        if not DEVICE_PATTERN.fullmatch(t.device):
            raise ConfigError(f"{source}: train.device = {t.device!r} is not one of auto, cpu, cuda, cuda:N")
        if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
            raise ConfigError(f"{source}: train.betas must be two numbers in [0, 1), got {t.betas}")
        if self.data.n_train is not None and t.batch_size > self.data.n_train:
            raise ConfigError(f"{source}: train.batch_size = {t.batch_size} exceeds data.n_train = {self.data.n_train}")
        self._check_cleanse(source)

    def check_inputs(self) -> None:
        """What the data the config names must offer its model; checked once the data source is known (a config given to
        the Python API may get its data there)."""
        data = self.data
        unlabelled = ("data.name = 'gaussian2d' has no labels" if data.name == "gaussian2d" else
                      "data.labels = 'none'" if data.name == "images" and data.labels == "none" else None)
        if self.model.conditional and unlabelled:
            raise ConfigError(f"model.conditional = true needs labelled data, but {unlabelled}")

    def _check_cleanse(self, source: str) -> None:
        """Each study list non-empty, naming known metrics and methods, and without repeats (a repeated seed would count
        one replicate twice): caught before any replicate trains."""
        c = self.cleanse
        if c.check == 1:
            raise ConfigError(f"{source}: cleanse.check = 1: a trust check needs at least 2 instances (0: off)")
        for key, what, known in (("metrics", "metric", METRICS), ("methods", "method", METHODS),
                                 ("removal_rates", "removal rate", None), ("seeds", "seed", None),
                                 ("evaluate", "evaluation metric", EVALUATION_METRICS)):
            values = getattr(c, key)
            if not values and key != "evaluate":
                raise ConfigError(f"{source}: cleanse.{key} is empty: list at least one {what}")
            seen: set = set()
            for v in values:
                if key == "metrics" and v in EVALUATION_METRICS:
                    raise ConfigError(f"{source}: cleanse.metrics lists {v!r}, which is evaluation only: list it in "
                                      "cleanse.evaluate")
                if known is not None and v not in known:
                    raise ConfigError(f"{source}: cleanse.{key} has unknown {what} {v!r} (known: {', '.join(known)})")
                if v in seen:
                    raise ConfigError(f"{source}: cleanse.{key} lists {what} {v!r} more than once")
                seen.add(v)

    def resolved(self) -> "Config":
        """A copy with every derived default made explicit."""
        data, train, metric = (dataclasses.replace(section) for section in (self.data, self.train, self.metric))
        if data.n_train is None and data.name == "gaussian2d":
            data.n_train = GAUSSIAN2D_N_TRAIN
        if train.record_from_epoch is None:
            train.record_from_epoch = train.epochs - 1
        if metric.n_samples is None:
            metric.n_samples = data.n_valid
        if metric.seed is None:
            metric.seed = train.seed
        return dataclasses.replace(self, data=data, train=train, metric=metric)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return dump_toml(self.to_dict())


def _build_section(cls: type, values: dict[str, Any], section: str, source: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{source}: unknown key {section}.{key} (known in [{section}]: {', '.join(fields)})")
        options = fields[key].default_factory  # a scorer table's options dataclass, else a plain key
        if not (isinstance(options, type) and issubclass(options, ScorerOptions)):
            kwargs[key] = checked(fields[key], value, f"{source}: {section}.{key}")
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: [{section}.{key}] must be a table, got {type(value).__name__}")
        try:
            kwargs[key] = options.from_mapping(value)
        except ConfigError as e:
            raise ConfigError(f"{source}: [{section}.{key}]: {e}") from None
    return cls(**kwargs)


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config file; every problem is a ConfigError naming the file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, not a config file")
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if not path.is_file():  # a FIFO or device could block or never end
        raise ConfigError(f"{path}: not a regular file")
    if path.stat().st_size > CONFIG_MAX_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size} bytes, more than a config file may hold ({CONFIG_MAX_BYTES})")
    try:
        data = path.read_bytes()
        raw = tomllib.loads(data.decode("utf-8"))  # TOML is UTF-8 whatever the locale says
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except RecursionError:  # tomllib parses nested arrays and inline tables recursively
        raise ConfigError(f"{path}: not valid TOML: arrays or inline tables nested too deeply") from None
    cfg = Config.from_dict(raw, source=str(path))
    cleanse = raw.get("cleanse") if isinstance(raw.get("cleanse"), dict) else {}
    moves = [f"{key} as {name} in [cleanse.{table}]" for key, (table, name) in LEGACY_CLEANSE_KEYS.items()
             if key in cleanse]
    if moves:
        warnings.warn(f"{path}: these [cleanse] keys are deprecated and will not be read in a later release; "
                      f"write {'; '.join(moves)}", ConfigDeprecationWarning, stacklevel=2)
    return cfg


def embedded_config(name: str) -> Config:
    """A config shipped inside the package (``gancleanse/examples/NAME.toml``)."""
    text = resources.files("gancleanse").joinpath(f"examples/{name}.toml").read_text()
    return Config.from_dict(tomllib.loads(text), source=f"embedded {name}.toml")
