"""The FID Inception-v3 feature space: features and logits equal torch-fidelity's on the same weights file, FID and
KID equal torch-fidelity's functions, the loader accepts the published layout and refuses damaged files with one
line, and the VJP to the images matches finite differences in float64.

torch-fidelity is a test-only reference (scripts/setup.sh installs it without dependencies). Its ``__init__`` imports
torchvision, which this CPU torch cannot import, so its modules are loaded from its directory under an empty package
(and a placeholder for ``torch_fidelity.utils``, whose loaders the metric modules name but these tests never call).
Weights are random (He-scaled, so activations stay of order one); the network's cost does not depend on them.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Iterator

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from gancleanse.errors import ConfigError, DataError
from gancleanse.features.base import FeatureModel
from gancleanse.features.inception import (
    InceptionV3,
    find_weights,
    load_for_run,
    load_inception,
    resize_tf1,
)
from gancleanse.features.weights import PUBLISHED_NAMES
from gancleanse.metrics.fid import frechet_inception_distance
from gancleanse.metrics.kid import kernel_inception_distance

F64 = torch.float64


# ---------------------------------------------------------------------------- helpers
def randomized(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Random values for every tensor of ``state`` (its names and shapes kept): He-normal convolutions, batch norms
    near the identity, a 1/sqrt(d) fc; integer counters left as they are."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in state.items():
        if not t.is_floating_point():
            out[name] = t.clone()
        elif name.endswith("conv.weight"):
            out[name] = torch.randn(t.shape, generator=g) * (2.0 / t[0].numel()) ** 0.5
        elif name.endswith(("bn.weight", "running_var")):
            out[name] = 0.75 + 0.5 * torch.rand(t.shape, generator=g)
        elif name == "fc.weight":
            out[name] = torch.randn(t.shape, generator=g) / t.shape[1] ** 0.5
        else:
            out[name] = 0.1 * torch.randn(t.shape, generator=g)
    return out


def pixels(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def as_unit_range(k: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels k -> k / 127.5 - 1: gancleanse's range, the same pixels torch-fidelity sees."""
    return k.to(dtype) / 127.5 - 1.0


def relative_error(found: torch.Tensor, reference: torch.Tensor) -> float:
    return float((found.double() - reference.double()).abs().max() / reference.double().abs().max())


def one_line_error(kind: type[Exception], call, *fragments: str) -> str:
    with pytest.raises(kind) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random weights under the network's keys (the published layout, checked against torch-fidelity below),
    without the batch-norm counters."""
    path = tmp_path_factory.mktemp("weights") / "inception.pth"
    torch.save(randomized(InceptionV3().state_dict(), seed=1), path)
    return path


@pytest.fixture(scope="module")
def model(weights_file: Path) -> FeatureModel:
    return load_inception(weights_file)


@pytest.fixture(scope="module")
def fidelity() -> Iterator[SimpleNamespace]:
    """torch-fidelity's modules, loaded from its directory without running its ``__init__``."""
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torch-fidelity is not installed (scripts/setup.sh installs it)")
    ours = [k for k in sys.modules if k == "torch_fidelity" or k.startswith("torch_fidelity.")]
    saved = {k: sys.modules.pop(k) for k in ours}
    package = ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    utils = ModuleType("torch_fidelity.utils")

    def unavailable(name: str) -> object:
        return lambda *args, **kwargs: pytest.fail(f"torch_fidelity.utils.{name} is not available here")

    utils.__getattr__ = unavailable  # type: ignore[method-assign]
    sys.modules.update({"torch_fidelity": package, "torch_fidelity.utils": utils})
    try:
        yield SimpleNamespace(load=lambda name: importlib.import_module(f"torch_fidelity.{name}"))
    finally:
        for k in [k for k in sys.modules if k == "torch_fidelity" or k.startswith("torch_fidelity.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def fidelity_layout(fidelity: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """torch-fidelity's own Inception state dict (names, shapes), built with its weight loading patched out."""
    module = fidelity.load("feature_extractor_inceptionv3")
    with monkeypatch.context() as patch:
        patch.setattr(module, "load_state_dict_from_url", lambda *a, **k: {})
        patch.setattr(module.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        return module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()


# ---------------------------------------------------------------------------- against torch-fidelity
def test_features_and_logits_equal_torch_fidelity(fidelity, monkeypatch, tmp_path):
    path = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(randomized(fidelity_layout(fidelity, monkeypatch), seed=2), path)  # with the batch-norm counters
    reference = fidelity.load("feature_extractor_inceptionv3").FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path))
    k = pixels((2, 3, 17, 331), seed=3)  # taller and narrower than 299: both resize directions
    with torch.no_grad():
        want_features, want_logits = reference(k)
        features, logits = load_inception(path).module(as_unit_range(k))
    assert features.shape == (2, 2048) and logits.shape == (2, 1008)
    assert relative_error(features, want_features) < 1e-5
    assert relative_error(logits, want_logits) < 1e-5
    assert float(want_features.abs().mean()) > 1e-2  # the comparison is not between vanishing activations


def test_published_layout_is_what_the_loader_accepts(fidelity, monkeypatch, tmp_path):
    published = {k: v for k, v in fidelity_layout(fidelity, monkeypatch).items()
                 if not k.endswith(".num_batches_tracked")}
    ours = InceptionV3().state_dict()
    assert list(ours) == list(published)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in published.items()}
    path = tmp_path / PUBLISHED_NAMES[0]  # the layout without the counters loads too
    state = randomized(published, seed=4)
    torch.save(state, path)
    loaded = load_inception(path).module.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_resize_equals_torch_fidelity_resize(fidelity):
    reference = fidelity.load("interpolate_compat_tensorflow").interpolate_bilinear_2d_like_tensorflow1x
    g = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, F64):
        for shape in [(2, 3, 8, 8), (1, 1, 17, 331), (1, 2, 299, 299), (1, 3, 400, 310)]:
            x = torch.rand(shape, generator=g, dtype=dtype) * 255
            want = reference(x, size=(299, 299), align_corners=False)
            assert torch.equal(resize_tf1(x), want), (dtype, shape)


def test_resize_by_hand():
    """2 -> 4 samples at 0, 0.5, 1, 1.5 (TensorFlow 1.x: no half-pixel offset), the last clamped to the last pixel."""
    x = torch.tensor([[0.0, 8.0], [4.0, 12.0]]).view(1, 1, 2, 2)
    row = torch.tensor([0.0, 4.0, 8.0, 8.0])
    want = torch.stack([row, row + 2.0, row + 4.0, row + 4.0]).view(1, 1, 4, 4)
    assert torch.equal(resize_tf1(x, 4), want)


def test_fid_and_kid_equal_torch_fidelity(fidelity):
    pytest.importorskip("tqdm")  # torch-fidelity's KID module imports it
    fid_module, kid_module = fidelity.load("metric_fid"), fidelity.load("metric_kid")
    g = torch.Generator().manual_seed(6)
    mix = torch.randn(48, 48, generator=g, dtype=F64) / 48 ** 0.5
    real = torch.randn(300, 48, generator=g, dtype=F64) @ mix
    generated = (torch.randn(300, 48, generator=g, dtype=F64) @ mix).exp() + 0.3
    want_fid = fid_module.fid_statistics_to_metric(fid_module.fid_features_to_statistics(real),
                                                   fid_module.fid_features_to_statistics(generated),
                                                   verbose=False)[fid_module.KEY_METRIC_FID]
    assert float(frechet_inception_distance(real, generated)) == pytest.approx(want_fid, rel=1e-9)
    want_kid = kid_module.kid_features_to_metric(real, generated, kid_subsets=1, kid_subset_size=300,
                                                 verbose=False)[kid_module.KEY_METRIC_KID_MEAN]
    assert float(kernel_inception_distance(real, generated, degree=3)) == pytest.approx(want_kid, rel=1e-9)


# ---------------------------------------------------------------------------- loading
def test_record_key_and_safetensors_copy(model, weights_file, tmp_path):
    digest = hashlib.sha256(weights_file.read_bytes()).hexdigest()
    assert model.record["sha256"] == digest and model.key == f"inception:{digest[:16]}"
    assert model.record["file"] == str(weights_file) and model.record["published_file"] is False
    assert model.space == "inception" and model.has_logits and model.dtype == torch.float32
    copy = tmp_path / "inception.safetensors"
    save_file(torch.load(weights_file, weights_only=True), str(copy))
    x = as_unit_range(pixels((1, 3, 12, 12), seed=7))
    features, logits = load_inception(copy)(x)
    want_features, want_logits = model(x)
    assert torch.equal(features, want_features) and torch.equal(logits, want_logits)


def test_damaged_files_are_refused_in_one_line(weights_file, tmp_path):
    state = torch.load(weights_file, weights_only=True)
    renamed = {("Mixed_5b.branch1x1.conv.kernel" if k == "Mixed_5b.branch1x1.conv.weight" else k): v
               for k, v in state.items()}
    torch.save(renamed, tmp_path / "names.pth")
    one_line_error(DataError, lambda: load_inception(tmp_path / "names.pth"), "names.pth",
                   "missing keys Mixed_5b.branch1x1.conv.weight", "unexpected keys Mixed_5b.branch1x1.conv.kernel")
    torch.save({**state, "fc.weight": state["fc.weight"][:1000]}, tmp_path / "shape.pth")
    one_line_error(DataError, lambda: load_inception(tmp_path / "shape.pth"), "shape.pth", "fc.weight",
                   "(1000, 2048)", "expected (1008, 2048)")
    data = weights_file.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    one_line_error(DataError, lambda: load_inception(tmp_path / "cut.pth"), "cut.pth", "truncated")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "cut.pth").read_bytes())
    one_line_error(DataError, lambda: load_inception(tmp_path / "cut.safetensors"), "cut.safetensors", "truncated")
    torch.save([state["fc.weight"]], tmp_path / "list.pth")
    one_line_error(DataError, lambda: load_inception(tmp_path / "list.pth"), "list.pth", "not a state dict")
    torch.save({**state, "fc.bias": torch.full((1008,), float("nan"))}, tmp_path / "nan.pth")
    one_line_error(DataError, lambda: load_inception(tmp_path / "nan.pth"), "fc.bias", "non-finite")
    one_line_error(DataError, lambda: load_inception(tmp_path / "absent.pth"), "absent.pth", "no such file")


def test_no_pickled_code_runs(tmp_path):
    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "ran",))

    torch.save({"fc.weight": Payload()}, tmp_path / "code.pth")
    one_line_error(DataError, lambda: load_inception(tmp_path / "code.pth"), "code.pth")
    assert not (tmp_path / "ran").exists()


# ---------------------------------------------------------------------------- images and gradients
def test_grayscale_is_the_channel_replicated(model):
    gray = as_unit_range(pixels((1, 1, 10, 14), seed=8))
    features, logits = model(gray)
    want_features, want_logits = model(gray.expand(-1, 3, -1, -1).contiguous())
    assert torch.equal(features, want_features) and torch.equal(logits, want_logits)
    one_line_error(DataError, lambda: model(torch.zeros(1, 2, 8, 8)), "C = 1 or 3", "(1, 2, 8, 8)")


def test_vjp_to_the_images_matches_finite_differences(weights_file):
    """Central differences along unit directions, compared gradcheck-style against the gradient's norm. The map is
    piecewise linear in the pixels (resize, affine batch norms, ReLU, pools), so a small step is exact up to
    round-off unless one of its millions of ReLUs turns within the step: the step is kept small for that."""
    model = load_inception(weights_file, F64)
    assert model.dtype == F64 and all(p.dtype == F64 and not p.requires_grad for p in model.module.parameters())
    g = torch.Generator().manual_seed(11)
    x = (torch.rand(1, 1, 12, 10, generator=g, dtype=F64) * 2 - 1).requires_grad_(True)
    weight_f, weight_l = torch.randn(1, 2048, generator=g, dtype=F64), torch.randn(1, 1008, generator=g, dtype=F64)

    def scalar(images: torch.Tensor) -> torch.Tensor:
        features, logits = model(images)
        return (features * weight_f).sum() + (logits * weight_l).sum()

    (gradient,) = torch.autograd.grad(scalar(x), x)
    scale, step = float(gradient.norm()), 1e-7
    assert scale > 1e-3
    with torch.no_grad():
        for _ in range(3):
            direction = torch.randn(x.shape, generator=g, dtype=F64)
            direction /= direction.norm()
            difference = (scalar(x + step * direction) - scalar(x - step * direction)) / (2 * step)
            assert abs(float(difference) - float((gradient * direction).sum())) < 1e-5 * scale


def test_resize_gradient():
    x = torch.rand(1, 2, 4, 5, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: resize_tf1(t, 13), (x,))


# ---------------------------------------------------------------------------- finding the file
def fake_run(weights: str | None, sample_shape: tuple[int, ...], dtype: torch.dtype = torch.float32):
    metric = SimpleNamespace(weights=weights)
    return SimpleNamespace(cfg=SimpleNamespace(metric=metric, data=SimpleNamespace(name="custom")), dtype=dtype,
                           splits=SimpleNamespace(sample_shape=sample_shape))


def test_find_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    assert find_weights(None) is None
    cache.mkdir(parents=True)
    (cache / PUBLISHED_NAMES[1]).write_bytes(b"x")
    assert find_weights(None) == cache / PUBLISHED_NAMES[1]
    (cache / PUBLISHED_NAMES[0]).write_bytes(b"x")
    assert find_weights(None) == cache / PUBLISHED_NAMES[0]
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "mine.pth").write_bytes(b"x")
    assert find_weights("~/mine.pth") == tmp_path / "mine.pth"
    one_line_error(ConfigError, lambda: find_weights("~/absent.pth"), str(tmp_path / "absent.pth"), "missing",
                   str(cache), "gancleanse weights inception")


def test_load_for_run(tmp_path, monkeypatch, weights_file):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    one_line_error(ConfigError, lambda: load_for_run(fake_run(None, (3, 8, 8))),
                   str(tmp_path / "torch" / "hub" / "checkpoints"), "[metric] weights", "gancleanse weights inception")
    one_line_error(DataError, lambda: load_for_run(fake_run(str(weights_file), (2, 8, 8))), "C = 1 or 3")
    one_line_error(DataError, lambda: load_for_run(fake_run(str(weights_file), (5,))), "(5,)")
    assert load_for_run(fake_run(str(weights_file), (1, 8, 8), torch.float64)).dtype == F64
    found = load_for_run(fake_run(str(weights_file), (3, 8, 8), torch.float32))
    assert found.dtype == torch.float32 and next(found.module.parameters()).dtype == torch.float32


def test_real_file_when_present():
    """The published file, where a machine has it: its hash and the features' shape (nothing is downloaded)."""
    from gancleanse.features.weights import PUBLISHED_SHA256

    path = find_weights(None)
    if path is None:
        pytest.skip("the published Inception weights are not in torch.hub's checkpoint cache")
    model = load_inception(path)
    assert model.record["sha256"] == PUBLISHED_SHA256 and model.record["published_file"] is True
    features, logits = model(torch.zeros(1, 3, 8, 8))
    assert features.shape == (1, 2048) and logits.shape == (1, 1008)
    assert np.isfinite(features.numpy()).all()
