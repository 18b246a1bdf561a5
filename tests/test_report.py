"""The study report: self-contained HTML, decodable figures, tables matching the study, CLI, browser."""

from __future__ import annotations

import base64
import csv
import html
import json
import re
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from test_cleanse import STUDY

import gancleanse as gc
from gancleanse.cli import main
from gancleanse.config import Config
from gancleanse.specs import HIGHER_IS_BETTER
from gancleanse.study.report import write_report

IMAGE_STUDY = {
    "data": {"name": "digits", "n_train": 200, "n_valid": 100, "n_test": 100, "seed": 1},
    "model": {"arch": "dcgan", "z_dim": 4, "g_hidden": 5, "d_hidden": 5, "activation": "softplus",
              "norm": "layer", "bias": True},
    "train": {"epochs": 2, "batch_size": 50, "lr_d": 0.01, "lr_g": 0.01},
    "metric": {"n_samples": 64, "classifier_epochs": 5},
    "cleanse": {"metrics": ["fid"], "methods": ["itd", "random"], "removal_rates": [0.0, 0.1], "seeds": [0, 1],
                "check": 8},
}
SECTIONS = ("summary", "plots", "table", "trust", "scores", "samples", "config")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def study_2d(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report2d")
    gc.cleanse(Config.from_dict(STUDY), out, report=True, progress=False)
    return out


@pytest.fixture(scope="module")
def study_images(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report_images")
    gc.cleanse(Config.from_dict(IMAGE_STUDY), out, report=True, progress=False)
    return out


@pytest.fixture(params=["study_2d", "study_images"])
def study(request) -> Path:
    return request.getfixturevalue(request.param)


class Page(HTMLParser):
    """Every tag with its attributes and the section it sits in; <pre> text; table rows by table id."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str], str | None]] = []
        self.section: str | None = None
        self.table: str | None = None
        self.rows: dict[str, list[dict[str, str]]] = {}
        self.pre: list[str] = []
        self._in_pre = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag in ("section", "header"):
            self.section = a.get("id")
        if tag == "table":
            self.table = a.get("id")
        if tag == "tr" and self.table and "class" in a:
            self.rows.setdefault(self.table, []).append(a)
        self._in_pre = tag == "pre"
        self.tags.append((tag, a, self.section))

    def handle_endtag(self, tag: str) -> None:
        if tag == "pre":
            self._in_pre = False

    def handle_data(self, data: str) -> None:
        if self._in_pre:
            self.pre.append(data)

    def images(self, section: str | None = None) -> list[dict[str, str]]:
        return [a for t, a, s in self.tags if t == "img" and section in (None, s)]


def read(out: Path) -> tuple[str, Page]:
    text = (out / "report.html").read_text(encoding="utf-8")
    return text, Page(text)


def png_size(src: str) -> tuple[int, int]:
    """Width and height from the IHDR chunk of a base64 PNG data URI (checks the signature)."""
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    data = base64.b64decode(src[len(prefix):], validate=True)
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_report_is_self_contained_and_images_decode(study):
    text, page = read(study)
    assert "<link" not in text.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", text, re.I)
    assert "@import" not in text and "url(" not in text
    for tag, attrs, _ in page.tags:
        assert tag not in ("script", "iframe", "object", "embed")
        if "src" in attrs:
            assert attrs["src"].startswith("data:"), (tag, attrs["src"][:60])
    images = page.images()
    assert images
    for a in images:
        w, h = png_size(a["src"])
        assert w > 0 and h > 0
    ids = [a.get("id") for t, a, _ in page.tags if t in ("section", "header")]
    assert ids == list(SECTIONS)
    assert 'class="note"' not in text  # a finished study has every input of every section


def test_tables_match_the_summary(study):
    text, page = read(study)
    summary = json.loads((study / "summary.json").read_text())
    rows = page.rows["by-rate"]
    assert len(rows) == len(summary["by_rate"])
    for row, e in zip(rows, summary["by_rate"]):
        change = (1.0 if HIGHER_IS_BETTER[e["eval_metric"]] else -1.0) * e["mean_delta"]
        expected = "good" if change > 0 else "bad" if change < 0 else "zero"
        assert row["class"].split()[0] == expected
        assert ("sig" in row["class"].split()) == (e["p_value"] is not None and e["p_value"] < 0.05)
    cells = re.findall(r'<td class="chg">([^<]*)</td>', text.split('id="chosen"')[0])
    assert [float(c) for c in cells] == pytest.approx([e["mean_delta"] for e in summary["by_rate"]],
                                                      rel=1e-2, abs=1e-300)
    assert len(page.rows["chosen"]) == len(summary["rate_chosen_on_validation"])
    # the trust column beside every scorer's results, and the per-seed trust table
    trust_cells = re.findall(r'<td class="trust[^"]*">([^<]*)</td>', text.split('id="chosen"')[0])
    checks = {(c["method"], c["score_metric"]): c for c in summary["checks"]}
    assert trust_cells == [f'{checks[(e["method"], e["score_metric"])]["mean_kendall_tau"]:.2f} '
                           f'({checks[(e["method"], e["score_metric"])]["n_trusted"]}/2)' for e in summary["by_rate"]]
    table = text.split('id="trust-checks"')[1].split("</table>")[0]
    seed_cells = re.findall(r'<td class="(weak|)">([^<]*)</td>', table)
    expected = [("weak" if not ok and c["method"] in ("itd", "aid") else "", f"{t:.2f} [{iv[0]:.2f}, {iv[1]:.2f}]")
                for c in summary["checks"] for t, iv, ok in zip(c["kendall_tau"], c["kendall_tau_interval"],
                                                                  c["trusted"])]
    assert seed_cells == expected
    # the config appears verbatim
    assert "".join(page.pre) == (study / "config.toml").read_text()


def test_headline_names_the_best_scorer_and_rate(study):
    text, _ = read(study)
    summary = json.loads((study / "summary.json").read_text())
    headlines = re.findall(r'<div class="card headline[^"]*">(.*?)</div>', text, re.S)
    metrics = list(dict.fromkeys(e["eval_metric"] for e in summary["by_rate"]))
    assert len(headlines) == len(metrics)
    for metric, line in zip(metrics, headlines):
        sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
        cands = [e for e in summary["by_rate"] if e["eval_metric"] == metric and e["n_removed"] > 0]
        best = max(cands, key=lambda e: sign * e["mean_delta"])
        plain = re.sub(r"<[^>]+>", "", html.unescape(line))
        assert f"{best['method']}-{best['score_metric']} removing {100 * best['removal_rate']:g}%" in plain
        assert ("lower" if sign < 0 else "higher") + " is better" in plain
        assert "validation" in plain


def test_2d_report_figures(study_2d):
    _, page = read(study_2d)
    metrics = STUDY["cleanse"]["metrics"]
    assert len(page.images("plots")) == len(metrics)
    assert len(page.images("scores")) == 2  # one scatter per influence scorer: itd-all, itd-loss_d
    # the original GAN and, per metric, the best removal of seed 0 (two metrics may share one)
    assert 2 <= len(page.images("samples")) <= 1 + len(metrics)


def test_image_report_grids_show_the_scored_extremes(study_images):
    _, page = read(study_images)
    grids = page.images("scores")
    assert len(grids) == 2 and all(a.get("class") == "pixels" for a in grids)
    with open(study_images / "seeds" / "seed_0" / "scores" / "itd-fid.csv") as f:
        harm = np.array([float(r["harmfulness"]) for r in csv.DictReader(f)])
    order = np.argsort(-harm, kind="stable")
    shown = [[int(i) for i in a["title"].split("indices:")[1].split(",")] for a in grids]
    assert shown[0] == order[:32].tolist()
    assert shown[1] == order[::-1][:32].tolist()
    assert harm[shown[0]].min() >= harm[shown[1]].max()
    # 32 tiles of 8x8, 8 per row: a 4 x 8 grid at the same scale in both directions
    w, h = png_size(grids[0]["src"])
    assert w / h == pytest.approx((8 * 9 + 1) / (4 * 9 + 1))
    samples = page.images("samples")
    assert len(samples) == 2  # the original GAN and the best removal for FID
    assert {png_size(a["src"]) for a in samples} == {png_size(samples[0]["src"])}


def test_missing_inputs_become_notes(study_2d, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(study_2d, out)
    (out / "report.html").unlink()
    (out / "config.toml").unlink()
    (out / "seeds" / "seed_0" / "scores" / "itd-all.csv").unlink()
    for p in (out / "parts").glob("seed0_none.samples.safetensors"):
        p.unlink()
    assert write_report(out) == out / "report.html"
    text, page = read(out)
    assert "itd-all.csv is missing" in text
    assert "seed0_none.samples.safetensors is missing" in text
    assert "config.toml is missing" in text
    assert len(page.images("scores")) == 1 and len(page.images("samples")) >= 1


def test_cli_regenerates_the_report(study_2d, capsys):
    report = study_2d / "report.html"
    before = report.read_text()
    report.unlink()
    assert main(["report", str(study_2d)]) == 0
    assert report.read_text() == before  # regenerated purely from the study's files
    assert str(report) in capsys.readouterr().out
    assert not list(study_2d.glob("report.html.tmp"))


def test_cli_report_on_a_non_study_directory(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "results.csv" in err and str(tmp_path) in err
    assert not (tmp_path / "report.html").exists()


CHECK_SCRIPT = """<script>
(function () {
  var errors = [];
  window.onerror = function (msg) { errors.push(String(msg)); };
  var original = console.error;
  console.error = function () { errors.push(Array.prototype.join.call(arguments, " ")); original.apply(console, arguments); };
  window.addEventListener("load", function () {
    var imgs = Array.prototype.slice.call(document.images);
    var rendered = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
    var pre = document.createElement("pre");
    pre.id = "check";
    pre.textContent = JSON.stringify({images: imgs.length, rendered: rendered, errors: errors});
    document.body.appendChild(pre);
  });
})();
</script>
"""


def test_report_renders_in_chromium(study, tmp_path):
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium not installed (Debian package chromium): report not checked in a browser")
    text = (study / "report.html").read_text(encoding="utf-8")
    assert text.count("</body>") == 1
    page = tmp_path / "page.html"
    page.write_text(text.replace("</body>", CHECK_SCRIPT + "</body>"), encoding="utf-8")
    # Everything Chromium writes (profile, caches, crash dumps, dconf, fontconfig) goes under tmp_path.
    import os

    home = tmp_path / "home"
    env = {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"),
           "XDG_CONFIG_HOME": str(home / ".config"), "XDG_DATA_HOME": str(home / ".local" / "share"),
           "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-breakpad", "--no-default-browser-check", f"--user-data-dir={tmp_path / 'profile'}",
         f"--crash-dumps-dir={tmp_path / 'crashes'}", f"--disk-cache-dir={tmp_path / 'cache'}",
         "--virtual-time-budget=10000", "--enable-logging=stderr", "--v=0", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=60, env=env)
    match = re.search(r'<pre id="check">(.*?)</pre>', proc.stdout, re.S)
    assert match, f"no check result in the dumped DOM; chromium stderr:\n{proc.stderr[-2000:]}"
    check = json.loads(html.unescape(match.group(1)))
    n_img = len(re.findall(r"<img\b", text))
    assert check["images"] == n_img > 0
    assert check["rendered"] == n_img
    assert check["errors"] == []
    # The report has no script of its own, so any console line (Chromium logs them all at INFO,
    # a failed resource load included) points at a problem in the page.
    console = [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]
    assert console == []
