"""Run directories that cannot lie: every damaged or edited file is refused by name, exit 2,
and no score file is written; `gancleanse verify` checks everything down to a bitwise replay."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Callable

import pytest
from safetensors.torch import load_file, save_file

from gancleanse.cli import main

from conftest import train_toml
from gancleanse.integrity import seal_of

CONFIG = """
[data]
n_train = 60
n_valid = 30
n_test = 30
seed = 3
[model]
activation = "softplus"
g_hidden = 8
d_hidden = 8
z_dim = 3
[train]
epochs = 2
batch_size = 10
lr_d = 0.05
lr_g = 0.05
record_from_epoch = 1
checkpoint_every = 2
update = "alternating"
[metric]
n_samples = 30
"""
FINAL = "checkpoints/step_00000012.safetensors"
START = "checkpoints/step_00000006.safetensors"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return train_toml(tmp_path_factory.mktemp("integrity"), CONFIG)


# ----------------------------------------------------------------------- corruptions
def edit_text(name: str, old: str, new: str) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        text = (run / name).read_text()
        assert old in text, (name, old)
        (run / name).write_text(text.replace(old, new, 1))
    return apply


def edit_config(key: str, value: str) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        text = (run / "config.toml").read_text()
        new, n = re.subn(rf"^{key} = .*$", f"{key} = {value}", text, count=1, flags=re.M)
        assert n == 1, key
        (run / "config.toml").write_text(new)
    return apply


def edit_tensors(name: str, fn: Callable[[dict], dict]) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        save_file(fn(load_file(str(run / name))), str(run / name))
    return apply


def edit_meta(fn: Callable[[dict], None], reseal: bool = False) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        meta = json.loads((run / "run.json").read_text())
        fn(meta)
        if reseal:
            meta["seal"] = seal_of(meta)
        (run / "run.json").write_text(json.dumps(meta))
    return apply


def write_bytes(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda run: (run / name).write_bytes(data)


def truncate(name: str) -> Callable[[Path], None]:
    return lambda run: (run / name).write_bytes((run / name).read_bytes()[:100])


def delete(name: str) -> Callable[[Path], None]:
    return lambda run: (run / name).unlink()


def changed(d: dict, key: str, fn) -> dict:
    return {**d, key: fn(d[key])}


def first_key(d: dict) -> str:
    return sorted(k for k in d if d[k].is_floating_point())[0]


def perturb_one(d: dict) -> dict:
    k = first_key(d)
    t = d[k].clone()
    t.view(-1)[0] += 1e-12
    return {**d, k: t}


def nan_one(d: dict) -> dict:
    k = first_key(d)
    t = d[k].clone()
    t.view(-1)[0] = float("nan")
    return {**d, k: t}


def set_index(value: int) -> Callable[[dict], dict]:
    def fn(d: dict) -> dict:
        idx = d["indices"].clone()
        idx[0, 0] = value
        return {**d, "indices": idx}
    return fn


def meta_set(path: str, value) -> Callable[[dict], None]:  # noqa: ANN001
    def fn(meta: dict) -> None:
        *parents, last = path.split(".")
        node = meta
        for p in parents:
            node = node[p]
        node[last] = value
    return fn


CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    # config.toml: every training option an edit could change
    "config lr_d": (edit_config("lr_d", "0.5"), "config.toml"),
    "config loss": (edit_config("loss", '"hinge"'), "config.toml"),
    "config activation": (edit_config("activation", '"tanh"'), "config.toml"),
    "config bandwidth": (edit_config("bandwidth", "2.0"), "config.toml"),
    "config optimizer": (edit_config("optimizer", '"adam"'), "config.toml"),
    "config dtype": (edit_config("dtype", '"float32"'), "config.toml"),
    "config batch_size": (edit_config("batch_size", "20"), "config.toml"),
    "config not utf-8": (write_bytes("config.toml", b"[train]\nlr_d = \xff\xfe\n"), "config.toml"),
    "config truncated": (truncate("config.toml"), "config.toml"),
    "config missing": (delete("config.toml"), "config.toml"),
    # schedule
    "schedule permuted": (edit_tensors("schedule.safetensors",
                                       lambda d: changed(d, "indices", lambda t: t.flip(0).contiguous())),
                          "schedule.safetensors"),
    "schedule scaled": (edit_tensors("schedule.safetensors", lambda d: changed(d, "z_d", lambda t: 2 * t)),
                        "schedule.safetensors"),
    "schedule negative index": (edit_tensors("schedule.safetensors", set_index(-1)), "schedule.safetensors"),
    "schedule index too large": (edit_tensors("schedule.safetensors", set_index(60)), "schedule.safetensors"),
    "schedule short": (edit_tensors("schedule.safetensors", lambda d: {k: v[:3].contiguous() for k, v in d.items()}),
                       "schedule.safetensors"),
    "schedule truncated": (truncate("schedule.safetensors"), "schedule.safetensors"),
    "schedule random bytes": (write_bytes("schedule.safetensors", bytes(range(256)) * 8), "schedule.safetensors"),
    "schedule missing": (delete("schedule.safetensors"), "schedule.safetensors"),
    # checkpoints
    "checkpoint replaced": (lambda r: shutil.copy(r / START, r / FINAL), FINAL),
    "checkpoint perturbed": (edit_tensors(FINAL, perturb_one), FINAL),
    "checkpoint nan": (edit_tensors(FINAL, nan_one), FINAL),
    "checkpoint truncated": (truncate(FINAL), FINAL),
    "checkpoint random bytes": (write_bytes(FINAL, b"\x00" * 64), FINAL),
    "checkpoint wrong dtype": (edit_tensors(FINAL, lambda d: {k: v.float() for k, v in d.items()}), FINAL),
    "checkpoint wrong shape": (edit_tensors(FINAL, lambda d: changed(d, first_key(d), lambda t: t.reshape(-1)[:-1])),
                               FINAL),
    "checkpoint missing key": (edit_tensors(FINAL, lambda d: {k: v for k, v in d.items() if k != first_key(d)}),
                               FINAL),
    "checkpoint missing": (delete(FINAL), FINAL),
    "window start checkpoint perturbed": (edit_tensors(START, perturb_one), START),
    # evaluation latents
    "eval latents scaled": (edit_tensors("eval_latents.safetensors", lambda d: changed(d, "valid", lambda t: 1.01 * t)),
                            "eval_latents.safetensors"),
    "eval latents nan": (edit_tensors("eval_latents.safetensors", nan_one), "eval_latents.safetensors"),
    "eval latents truncated": (truncate("eval_latents.safetensors"), "eval_latents.safetensors"),
    "eval latents missing": (delete("eval_latents.safetensors"), "eval_latents.safetensors"),
    # run.json
    "run.json n_train": (edit_meta(meta_set("n_train", 50)), "run.json"),
    "run.json window": (edit_meta(meta_set("window.start_step", 0)), "run.json"),
    "run.json total_steps": (edit_meta(meta_set("total_steps", 6)), "run.json"),
    "run.json threads": (edit_meta(meta_set("threads", 2)), "run.json"),
    "run.json n_train resealed": (edit_meta(meta_set("n_train", 50), reseal=True), "run.json"),
    "run.json window resealed": (edit_meta(meta_set("window.start_step", 0), reseal=True), "run.json"),
    "run.json threads resealed": (edit_meta(meta_set("threads", 2), reseal=True), "run.json"),
    "run.json hash removed resealed": (edit_meta(lambda m: m["files"].pop("config.toml"), reseal=True), "config.toml"),
    "run.json huge integer": (edit_meta(meta_set("n_train", 2 ** 70)), "run.json"),
    "run.json not json": (write_bytes("run.json", b"{\"format\": 2,"), "run.json"),
    "run.json not utf-8": (write_bytes("run.json", b"\xff\xfe{}"), "run.json"),
    "run.json a list": (write_bytes("run.json", b"[1, 2]"), "run.json"),
    "run.json nan": (edit_text("run.json", '"final_losses": {', '"final_losses": {"x": NaN, '), "run.json"),
    "run.json old format": (edit_meta(meta_set("format", 1)), "run.json"),
    "run.json incomplete": (edit_meta(meta_set("status", "training")), "run.json"),
    "run.json missing": (delete("run.json"), "run.json"),
}


def damaged_copy(pristine: Path, tmp_path: Path, corrupt: Callable[[Path], None], capsys) -> Path:  # noqa: ANN001
    """A copy of the pristine run with ``corrupt`` applied (and the captured output so far dropped)."""
    run = tmp_path / "run"
    shutil.copytree(pristine, run)
    corrupt(run)
    capsys.readouterr()
    return run


def assert_refused(code: int, err: str, names: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gancleanse: error:"), err
    assert names in lines[0], (names, lines[0])
    assert "Traceback" not in err


@pytest.mark.parametrize("case", sorted(CASES))
def test_influence_refuses_a_damaged_run(case, pristine, tmp_path, capsys):
    corrupt, names = CASES[case]
    run = damaged_copy(pristine, tmp_path, corrupt, capsys)
    out = tmp_path / "scores.csv"
    code = main(["influence", "--check", "0", str(run), "--metric", "all", "--out", str(out), "-q"])
    assert_refused(code, capsys.readouterr().err, names)
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert not list(tmp_path.glob("scores*"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_verify_refuses_a_damaged_run(case, pristine, tmp_path, capsys):
    corrupt, names = CASES[case]
    run = damaged_copy(pristine, tmp_path, corrupt, capsys)
    assert_refused(main(["verify", str(run), "-q"]), capsys.readouterr().err, names)


# Damage that keeps every hash consistent (run.json resealed with the new hashes): only
# the regenerated schedule and latents, and the bitwise replay, can tell.
def resealed(name: str, fn: Callable[[dict], dict]) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        from gancleanse.integrity import sha256_file

        edit_tensors(name, fn)(run)
        edit_meta(lambda m: m["files"].__setitem__(name, sha256_file(run / name)), reseal=True)(run)
    return apply


DEEP = {
    "schedule permuted": (resealed("schedule.safetensors",
                                   lambda d: changed(d, "indices", lambda t: t.flip(0).contiguous())),
                          "schedule.safetensors"),
    "generator latents scaled": (resealed("schedule.safetensors", lambda d: changed(d, "z_g", lambda t: 2 * t)),
                                 "schedule.safetensors"),
    "eval latents scaled": (resealed("eval_latents.safetensors", lambda d: changed(d, "test", lambda t: 2 * t)),
                            "eval_latents.safetensors"),
    "final checkpoint perturbed": (resealed(FINAL, perturb_one), FINAL),
    "final checkpoint nan": (resealed(FINAL, nan_one), FINAL),
    "schedule index out of range": (resealed("schedule.safetensors", set_index(60)), "schedule.safetensors"),
    "mid-window checkpoint perturbed": (resealed("checkpoints/step_00000008.safetensors", perturb_one),
                                        "step_00000008"),
}


@pytest.mark.parametrize("case", sorted(DEEP))
def test_verify_catches_damage_with_consistent_hashes(case, pristine, tmp_path, capsys):
    corrupt, names = DEEP[case]
    run = damaged_copy(pristine, tmp_path, corrupt, capsys)
    assert_refused(main(["verify", str(run), "-q"]), capsys.readouterr().err, names)


@pytest.mark.parametrize("case", ["final checkpoint nan", "schedule index out of range"])
def test_every_reader_refuses_non_finite_or_wrapping_content(case, pristine, tmp_path, capsys):
    """Values a hash cannot vouch for: NaN is never read, an index never wraps around."""
    corrupt, names = DEEP[case]
    run = damaged_copy(pristine, tmp_path, corrupt, capsys)
    out = tmp_path / "scores.csv"
    assert_refused(main(["influence", "--check", "0", str(run), "--out", str(out), "-q"]), capsys.readouterr().err, names)
    assert not out.exists()


def test_verify_passes_an_intact_run_and_says_what_it_checked(pristine, capsys):
    assert main(["verify", str(pristine), "-q"]) == 0
    out = capsys.readouterr().out
    for what in ("run.json: sealed", "files match the sha256", "schedule.safetensors", "eval_latents",
                 "checkpoints: readable and finite", "reproduce 3 checkpoint(s) bitwise"):
        assert what in out, (what, out)
    assert "every check passed" in out


def test_the_seal_covers_every_file_and_field(pristine):
    meta = json.loads((pristine / "run.json").read_text())
    files = {p.relative_to(pristine).as_posix() for p in pristine.rglob("*") if p.is_file()} - {"run.json"}
    assert set(meta["files"]) == files
    assert seal_of(meta) == meta["seal"]
    assert seal_of({**meta, "threads": meta["threads"] + 1}) != meta["seal"]


# ------------------------------------------------------------------- study parts
STUDY = CONFIG + """
[cleanse]
methods = ["itd", "random"]
removal_rates = [0.0, 0.1]
check = 4
seeds = [0]
"""
PART = "parts/seed0_itd-all_r0.1.json"
SCORES = "seeds/seed_0/scores/itd-all.csv"


def edit_json(name: str, fn: Callable[[dict], object]) -> Callable[[Path], None]:
    def apply(study: Path) -> None:
        rec = json.loads((study / name).read_text())
        (study / name).write_text(json.dumps(fn(rec)))
    return apply


def nan_harmfulness(path: Path) -> None:
    lines = path.read_text().splitlines()
    fields = lines[3].split(",")
    fields[2] = "nan"
    lines[3] = ",".join(fields)
    path.write_text("\n".join(lines) + "\n")


STUDY_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "part not json": (write_bytes(PART, b'{"all": {"test": 1.'), PART),
    "part nan": (edit_json(PART, lambda r: {**r, "all": {**r["all"], "test": float("nan")}}), PART),
    "part infinite": (edit_json(PART, lambda r: {**r, "all": {**r["all"], "valid": float("inf")}}), PART),
    "part metric missing": (edit_json(PART, lambda r: {k: v for k, v in r.items() if k != "all"}), PART),
    "part value a string": (edit_json(PART, lambda r: {**r, "all": {**r["all"], "test": "1.0"}}), PART),
    "part without provenance": (edit_json(PART, lambda r: {k: v for k, v in r.items() if k != "provenance"}), PART),
    "part a list": (write_bytes(PART, b"[1, 2]"), PART),
    "original nan": (edit_json("parts/seed0_original.json", lambda r: {**r, "all": {"test": float("nan"),
                                                                                     "valid": 0.0}}),
                     "seed0_original.json"),
    "scores nan": (lambda s: nan_harmfulness(s / SCORES), "itd-all.csv"),
    "scores short": (lambda s: (s / SCORES).write_text("\n".join((s / SCORES).read_text().splitlines()[:5])),
                     "itd-all.csv"),
    "scores garbage": (write_bytes(SCORES, b"index,influence,harmfulness,key\n0,x,y,#0\n"), "itd-all.csv"),
    "replicate run edited": (edit_config("lr_g", "0.9"), "config.toml"),
}


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("study")
    (d / "study.toml").write_text(STUDY)
    assert main(["cleanse", str(d / "study.toml"), "--out", str(d / "study"), "-q", "--no-report"]) == 0
    return d


@pytest.mark.parametrize("case", sorted(STUDY_CASES))
def test_a_resumed_study_refuses_damaged_parts(case, study, tmp_path, capsys):
    corrupt, names = STUDY_CASES[case]
    out = tmp_path / "study"
    shutil.copytree(study / "study", out)
    if case == "replicate run edited":
        corrupt(out / "seeds" / "seed_0" / "run")
    else:
        corrupt(out)
    (out / "results.csv").unlink()
    capsys.readouterr()
    code = main(["cleanse", str(study / "study.toml"), "--out", str(out), "-q", "--no-report"])
    assert_refused(code, capsys.readouterr().err, names)
    assert not (out / "results.csv").exists()
    assert not list(out.glob("*.tmp")) and not (out / ".lock").exists()
