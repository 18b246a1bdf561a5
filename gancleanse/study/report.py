"""The study report: one self-contained HTML page rebuilt from a study directory.

Everything comes from what the study wrote (results, summary, score files, the first seed's training
data and generated samples), so ``gancleanse report DIR`` can rebuild it at any time. Figures are PNG
data URIs and the style inline, so the file can be archived alone. Missing inputs give a short note.
"""

from __future__ import annotations

import math
from contextlib import suppress
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..config import Config, load_config
from ..errors import GancleanseError
from ..files import write_text_atomic
from ..scores import Scores
from ..specs import EVALUATION_METRICS, direction, metric_label
from .figures import as_images, dot, escape, figure, grid_png, new_axes, png
from .layout import read_json, retrain_key, scores_path
from .tables import read_results, scored, summarize
from .trust import TRUST_THRESHOLD, flagged

GRID_COUNT = 32  # most harmful / most helpful training images shown per scorer
MARKED = 50  # most harmful 2D instances circled per scorer
CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
main{max-width:1180px;margin:0 auto;padding:24px}
h1{margin:0 0 4px;font-size:26px}h2{margin:32px 0 12px;font-size:20px;border-bottom:2px solid #d8dce3;padding-bottom:4px}
h3{margin:4px 0 8px;font-size:15px}
.card{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.12);padding:14px 16px;margin:0 0 14px}
.facts{display:flex;flex-wrap:wrap;gap:8px 22px;font-size:14px;color:#4a5263}.facts b{color:#1d2330}
.headline{font-size:15px;line-height:1.5;border-left:5px solid #8a94a6}.headline.good{border-color:#2e9d5b}
.headline.bad{border-color:#c8463d}.row{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
.row .card{flex:0 1 auto}figure{margin:0}figcaption{font-size:12px;color:#5b6375;max-width:520px;margin-top:6px}
img{max-width:100%;height:auto}img.pixels{image-rendering:pixelated}
table{border-collapse:collapse;font-size:13px;width:100%;background:#fff}
th,td{padding:4px 8px;text-align:right;border-bottom:1px solid #e6e8ec}th{background:#eef0f4;position:sticky;top:0}
td.l,th.l{text-align:left}tr.good td.chg{background:#d9f2e1;color:#14532d}tr.bad td.chg{background:#f9dcd9;color:#7f1d1d}
tr.sig td.p{font-weight:bold}td.weak{background:#fdf0d5;color:#7c4a03}.note{color:#6b7280;font-style:italic}
pre{background:#1f2430;color:#e6e6e6;padding:12px;border-radius:6px;overflow:auto;font-size:12px}
"""

Row = dict[str, Any]


def write_report(study_dir: Path) -> Path:
    """Write ``study_dir/report.html`` from the study's files (atomically) and return its path."""
    study_dir = Path(study_dir)
    results = study_dir / "results.csv"
    if not results.is_file():
        raise GancleanseError(f"{study_dir} is not a finished cleansing study: {results} is missing "
                              "(run `gancleanse cleanse CONFIG --out DIR` first)")
    rows = read_results(results)
    if not rows:
        raise GancleanseError(f"{results} has no rows: the study did not finish")
    summary_path = study_dir / "summary.json"
    summary = read_json(summary_path)  # bounded; a missing or damaged one is rebuilt from results.csv
    summary = summary if isinstance(summary, dict) and "by_rate" in summary else summarize(rows)
    cfg = None  # an unreadable config leaves "?" in the header and a note in the config section
    with suppress(GancleanseError):
        cfg = load_config(study_dir / "config.toml")
    seed = rows[0]["seed"]  # the study keeps generated samples for its first seed only
    networks = summary.get("features")
    first = next(iter(networks.values()), {}) if isinstance(networks, dict) and networks else {}
    token = _SPACE.set(first.get("space") if isinstance(first, dict) else None)
    try:
        page = _page(study_dir, rows, summary, cfg, seed)
    finally:
        _SPACE.reset(token)
    out = study_dir / "report.html"
    write_text_atomic(out, page)
    return out


def _page(study_dir: Path, rows: list[Row], summary: dict[str, Any], cfg: Config | None, seed: int) -> str:
    body = [_header(study_dir, rows, summary, cfg),
            _section("plots", "Change of the test metric vs removal rate", lambda: _plots(summary["by_rate"])),
            _section("table", "Summary table", lambda: _tables(summary)),
            *([_section("evaluation", "What cleansing costs in fidelity and diversity (evaluation only)",
                        lambda: _evaluation(summary["by_rate"]))]
              if any(e["eval_metric"] in EVALUATION_METRICS for e in summary["by_rate"]) else []),
            _section("trust", "Trust check: does each ranking agree with retraining?", lambda: _trust(summary)),
            _section("scores", f"Harmful and helpful training instances (seed {seed})",
                     lambda: _scores(study_dir, rows, seed)),
            _section("samples", f"Generated samples before and after cleansing (seed {seed}, same latents)",
                     lambda: _samples(study_dir, rows, seed)),
            _section("config", "Config", lambda: _config_text(study_dir / "config.toml"))]
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>gancleanse report: {escape(study_dir.name)}</title><style>{CSS}</style></head>\n"
            f"<body><main>\n{''.join(body)}</main></body></html>\n")


# ------------------------------------------------------------------------- helpers
_SPACE: ContextVar[str | None] = ContextVar("feature_space", default=None)  # of the report being written


def _label(metric: str) -> str:
    """The metric's name in the study's feature space (``specs.metric_label``: FD, not FID, in an encoder's)."""
    return metric_label(metric, _SPACE.get())


def _direction(metric: str) -> str:
    return "higher is better" if direction(metric) > 0 else "lower is better"


def _number(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _rate(rate: float) -> str:
    return f"{100 * rate:g}%"


def _unique(values: list[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def _note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'


def _section(anchor: str, title: str, build: Callable[[], str]) -> str:
    """A titled section; missing or unreadable inputs give a note instead of failing the report."""
    try:
        content = build()
    except (OSError, ValueError, KeyError, RuntimeError, GancleanseError) as err:
        content = _note(f"Not available: {err}")
    return f'<section id="{anchor}"><h2>{escape(title)}</h2>\n{content}</section>\n'


def _training_data(run_dir: Path) -> np.ndarray:
    """The replicate's training split, verified, read without building its models."""
    from ..run import Run

    return Run.open(run_dir, device="cpu").splits.split("train").numpy()


# ------------------------------------------------------------------------ sections
def _network_fact(networks: Any) -> dict[str, str]:
    """The header's "features" fact: the network of the feature metrics (per seed when they differ), with the
    hash of its weights file or the key of its cached weights."""
    if not isinstance(networks, dict) or not networks:
        return {}
    described = {f"{r.get('space')} ({'sha256 ' + str(r['sha256'])[:12] if 'sha256' in r else r.get('key')})"
                 for r in networks.values() if isinstance(r, dict)}
    return {"features": "; ".join(sorted(described))}


def _header(study_dir: Path, rows: list[Row], summary: dict[str, Any], cfg: Config | None) -> str:
    facts = {"data": cfg.data.name if cfg else "?", "training instances": cfg.data.n_train if cfg else "?",
             "seeds": ", ".join(str(s) for s in _unique(r["seed"] for r in rows)),
             "evaluated on": ", ".join(_label(m) for m in _unique(r["eval_metric"] for r in rows)),
             "scorers": ", ".join(_unique(f"{r['method']}-{r['score_metric']}" for r in rows)),
             "removal rates": ", ".join(_rate(x) for x in sorted(_unique(r["removal_rate"] for r in rows))),
             "retrain": cfg.cleanse.retrain if cfg else "?", **_network_fact(summary.get("features"))}
    fact_html = "".join(f"<span>{escape(k)}: <b>{escape(v)}</b></span>" for k, v in facts.items())
    lines = [_headline(m, summary) for m in _unique(r["eval_metric"] for r in scored(rows))]
    return (f'<header id="summary"><h1>Cleansing study: {escape(study_dir.name)}</h1>'
            f'<div class="card facts">{fact_html}</div>\n{"".join(lines)}</header>\n')


def _headline(metric: str, summary: dict[str, Any]) -> str:
    """The best (scorer, rate) on the test split, and the scorer's result at validation-chosen rates."""
    sign = direction(metric)
    candidates = [e for e in summary["by_rate"] if e["eval_metric"] == metric and e["n_removed"] > 0]
    head = f"<b>{escape(_label(metric))}</b> ({_direction(metric)}): "
    if not candidates:
        return f'<div class="card headline">{head}no removal rate removed any instance.</div>'
    best = max(candidates, key=lambda e: sign * e["mean_delta"])
    good = sign * best["mean_delta"] > 0
    verdict = "best" if good else "no scorer improved it on average; least bad"
    text = (f"{head}{verdict}: <b>{escape(best['method'])}-{escape(best['score_metric'])}</b> removing "
            f"{_rate(best['removal_rate'])} ({best['n_removed']} instances): mean change "
            f"<b>{best['mean_delta']:+.3g}</b> &plusmn; {best['std_delta']:.2g} over {best['n_seeds']} "
            f"seed(s), p = {_number(best['p_value'], '.3g')}.")
    c = next((e for e in summary["rate_chosen_on_validation"] if e["eval_metric"] == metric
              and (e["method"], e["score_metric"]) == (best["method"], best["score_metric"])), None)
    if c is not None:
        text += (f" With the rate chosen on the validation split per seed (rates "
                 f"{', '.join(_rate(r) for r in c['chosen_rates'])}): {c['mean_delta']:+.3g} &plusmn; "
                 f"{c['std_delta']:.2g}, p = {_number(c['p_value'], '.3g')}.")
    at_best = [e for e in summary["by_rate"] if e["eval_metric"] in EVALUATION_METRICS and
               all(e[k] == best[k] for k in ("method", "score_metric", "removal_rate"))]
    if at_best:
        text += " At that removal (evaluation only): " + ", ".join(
            f"{escape(_label(e['eval_metric']))} {e['mean_before']:.3g} &rarr; {e['mean_after']:.3g} "
            f"({e['mean_delta']:+.3g})" for e in at_best) + "."
    return f'<div class="card headline {"good" if good else "bad"}">{text}</div>'


def _plots(by_rate: list[Row]) -> str:
    cards = []
    for metric in _unique(e["eval_metric"] for e in by_rate):
        fig, ax = new_axes(5.6, 3.6)
        entries = [e for e in by_rate if e["eval_metric"] == metric]
        for scorer in _unique((e["method"], e["score_metric"]) for e in entries):
            es = sorted((e for e in entries if (e["method"], e["score_metric"]) == scorer),
                        key=lambda e: e["removal_rate"])
            x, m, s = np.array([(100 * e["removal_rate"], e["mean_delta"], e["std_delta"]) for e in es]).T
            (line,) = ax.plot(x, m, marker="o", ms=4, label="-".join(scorer))
            ax.fill_between(x, m - s, m + s, color=line.get_color(), alpha=0.18, lw=0)
        ax.axhline(0.0, color="black", ls="--", lw=0.8)
        ax.set_xlabel("training instances removed (%)")
        ax.set_ylabel(f"mean change in test {_label(metric)}\n({_direction(metric)})")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.legend(fontsize=8)
        ax.set_title(f"{_label(metric)}: mean ± std across seeds", fontsize=10)
        caption = f"Above the dashed line is {'better' if direction(metric) > 0 else 'worse'}."
        cards.append(figure(png(fig), f"change of {_label(metric)} vs removal rate", caption))
    return f'<div class="row">{"".join(cards)}</div>'


def _tables(summary: dict[str, Any]) -> str:
    checks = {(c["method"], c["score_metric"]): c for c in summary.get("checks", [])}

    def row(e: Row, middle: str) -> str:
        """A table row: the scorer, ``middle``, then the change, its std and p, and the trust check."""
        change = direction(e["eval_metric"]) * e["mean_delta"]
        sig = " sig" if e["p_value"] is not None and e["p_value"] < 0.05 else ""
        c = checks.get((e["method"], e["score_metric"]))
        trust = ('<td class="trust">&ndash;</td>' if c is None else
                 f'<td class="trust{" weak" if c["n_flagged"] > 0 else ""}">'
                 f'{_number(c["mean_kendall_tau"], ".2f")} ({c["n_trusted"]}/{len(c["seeds"])})</td>')
        return (f'<tr class="{"good" if change > 0 else "bad" if change < 0 else "zero"}{sig}">{_scorer_cells(e)}'
                f'{middle}<td class="chg">{e["mean_delta"]:+.3g}</td><td>{e["std_delta"]:.2g}</td>'
                f'<td class="p">{_number(e["p_value"], ".3g")}</td>{trust}</tr>')

    by_rate = "".join(row(e, f'<td>{_rate(e["removal_rate"])}</td><td>{e["n_removed"]}</td>'
                             f'<td>{e["mean_before"]:.4g}</td>') for e in scored(summary["by_rate"]))
    chosen = "".join(row(e, f'<td>{", ".join(_rate(r) for r in e["chosen_rates"])}</td>')
                     for e in summary["rate_chosen_on_validation"])
    return (
        '<p>Change = after &minus; before on the test split, averaged over seeds; green: improved in the '
        "metric's direction, red: worse; p: one-sample t-test of the per-seed changes against 0 "
        "(bold below 0.05); trust: the scorer's mean Kendall tau against retraining in its trust check "
        "(seeds where the check trusts it / seeds; see below).</p>"
        + _table("by-rate", "metric", ["rate", "removed", "mean before", "mean change", "std", "p", "trust"], by_rate)
        + "<h3>Removal rate chosen on the validation split (per seed; the change is on the test split)</h3>"
        + _table("chosen", "metric", ["chosen rates", "mean change", "std", "p", "trust"], chosen))


def _evaluation(by_rate: list[Row]) -> str:
    """Per evaluation-only metric, scorer and rate: mean before, after and change, beside the change of each
    scored metric at the same scorer and rate."""
    targets = _unique(e["eval_metric"] for e in scored(by_rate))
    change = {(e["method"], e["score_metric"], e["removal_rate"], e["eval_metric"]): e["mean_delta"]
              for e in scored(by_rate)}

    def row(e: Row) -> str:
        sign = direction(e["eval_metric"]) * e["mean_delta"]
        beside = "".join(f'<td>{_number(change.get((e["method"], e["score_metric"], e["removal_rate"], t)), "+.3g")}'
                         "</td>" for t in targets)
        return (f'<tr class="{"good" if sign > 0 else "bad" if sign < 0 else "zero"}">{_scorer_cells(e)}'
                f'<td>{_rate(e["removal_rate"])}</td><td>{e["n_removed"]}</td><td>{e["mean_before"]:.4g}</td>'
                f'<td>{e["mean_after"]:.4g}</td><td class="chg">{e["mean_delta"]:+.3g}</td>'
                f'<td>{e["std_delta"]:.2g}</td><td class="p">{_number(e["p_value"], ".3g")}</td>{beside}</tr>')

    body = "".join(row(e) for e in by_rate if e["eval_metric"] in EVALUATION_METRICS)
    return ("<p>k-nearest-neighbour manifolds of the test images and the generated samples in the run's feature "
            "space, all higher is better: precision and density, how much of the generated set lies among real "
            "images (fidelity); recall and coverage, how much of the real set the generated one reaches "
            "(diversity). They are measured, never scored on or chosen by: a removal that improves the scored "
            "metric while recall or coverage falls traded diversity for fidelity. The last columns repeat the "
            "scored metrics' mean change at the same scorer and rate.</p>"
            + _table("evaluation-only", "metric", ["rate", "removed", "mean before", "mean after", "mean change",
                                                   "std", "p", *(f"change in {_label(t)}" for t in targets)], body))


def _scorer_cells(entry: Row, metric_key: str = "eval_metric") -> str:
    """The method, scored-on and metric cells that open a row of every table."""
    return (f'<td class="l">{escape(entry["method"])}</td><td class="l">{escape(entry["score_metric"])}</td>'
            f'<td class="l">{escape(_label(entry[metric_key]))}</td>')


def _table(table_id: str, metric_heading: str, headings: list[str], body: str) -> str:
    """A card with a table whose rows open with ``_scorer_cells``, then ``headings``' columns."""
    head = "".join(f'<th class="l">{h}</th>' for h in ("method", "scored on", metric_heading))
    head += "".join(f"<th>{h}</th>" for h in headings)
    return f'<div class="card"><table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _trust(summary: dict[str, Any]) -> str:
    checks = summary.get("checks") or []
    if not checks:
        return _note("No trust check was run ([cleanse] check = 0).")
    seeds = sorted({s for c in checks for s in c["seeds"]})
    body = "".join(_trust_row(c, seeds) for c in checks)
    return (f"<p>Per seed, each ranking's training window was retrained without each of {checks[0]['k']} "
            "instances (half from the ranking's extremes, half at random) and Kendall tau computed between the "
            "ranking and the actual improvement of the metric, with a 90% bootstrap interval. Amber: an "
            f"estimator (ITD, AID) whose interval's lower bound is below {TRUST_THRESHOLD}: on that seed its "
            "ranking agrees only weakly with retraining; to try: smooth activations, a shorter traced window, "
            "a larger check. Baselines do not predict single removals; their taus are a reference (random: "
            "about 0).</p>" + _table("trust-checks", "checked on", [f"seed {s}" for s in seeds] + ["mean tau"], body))


def _trust_row(check: dict[str, Any], seeds: list[int]) -> str:
    per_seed = dict(zip(check["seeds"], zip(check["kendall_tau"], check["kendall_tau_interval"], check["trusted"])))
    cells = []
    for s in seeds:
        if s not in per_seed:
            cells.append("<td>&ndash;</td>")
            continue
        tau, iv, trusted = per_seed[s]
        text = _number(tau, ".2f") + (f" [{iv[0]:.2f}, {iv[1]:.2f}]" if iv and tau is not None else "")
        weak = flagged({"trusted": trusted, "method": check["method"]})
        cells.append(f'<td class="{"weak" if weak else ""}">{escape(text)}</td>')
    mean = _number(check["mean_kendall_tau"], ".2f")
    return f'<tr>{_scorer_cells(check, "check_metric")}{"".join(cells)}<td>{mean}</td></tr>'


def _scores(study_dir: Path, rows: list[Row], seed: int) -> str:
    seed_dir = study_dir / "seeds" / f"seed_{seed}"
    scorers = _unique(f"{r['method']}-{r['score_metric']}" for r in rows)
    influence = [s for s in scorers if s.split("-", 1)[0] in ("itd", "aid")]
    x = _training_data(seed_dir / "run")
    images = as_images(x)
    if images is None and x.shape[1:] != (2,):
        return _note(f"No picture for training data of shape {tuple(x.shape[1:])}.")
    rates = [r["removal_rate"] for r in rows if r["removal_rate"] > 0]
    # Circle the first instances to go (smallest removal, at most MARKED): more would hide the colours.
    top_k = min(MARKED, max(1, math.floor(len(x) * min(rates)))) if rates else MARKED
    cards = []
    for name in influence or scorers:
        path = scores_path(seed_dir, name)
        if not path.is_file():
            cards.append(_note(f"{path.name} is missing."))
            continue
        loaded = Scores.load(path)
        harm, keys = loaded.harmfulness, loaded.key_list()
        if len(harm) != len(x):
            cards.append(_note(f"{path.name} has {len(harm)} scores for {len(x)} training instances."))
            continue
        order = loaded.ranking()
        if images is not None:
            for label, idx in (("most harmful", order[:GRID_COUNT]), ("most helpful", order[::-1][:GRID_COUNT])):
                ids = ", ".join(str(int(i)) for i in idx)
                named = ", ".join(keys[i] for i in idx)
                cards.append(figure(grid_png(images[idx]), f"{name}: {label} training images",
                                     f"<b>{escape(name)}</b>: the {len(idx)} {label} (row by row): "
                                     f"<span class=\"keys\">{escape(named)}</span>", f"indices: {ids}", pixels=True))
        else:
            cards.append(figure(_harm_scatter(x, harm, order[:top_k]), f"{name}: harmfulness",
                                 f"<b>{escape(name)}</b>: training set coloured by harmfulness (red: removal "
                                 f"predicted to help); circled: the {top_k} most harmful."))
    return f'<div class="row">{"".join(cards)}</div>'


def _harm_scatter(x: np.ndarray, harm: np.ndarray, marked: np.ndarray) -> str:
    fig, ax = new_axes(5.0, 4.2)
    lim = float(np.abs(harm).max()) or 1.0
    front = np.argsort(np.abs(harm), kind="stable")  # the most extreme colours are drawn last, on top
    pts = ax.scatter(x[front, 0], x[front, 1], c=harm[front], cmap="RdBu_r", vmin=-lim, vmax=lim, s=dot(len(x)))
    ax.scatter(x[marked, 0], x[marked, 1], s=60, facecolors="none", edgecolors="black", lw=0.9, label="most harmful")
    ax.set_aspect("equal", adjustable="datalim")
    ax.legend(fontsize=8, loc="upper right")
    fig.colorbar(pts, ax=ax, label="harmfulness (> 0: removal predicted to help)")
    return png(fig)


def _samples(study_dir: Path, rows: list[Row], seed: int) -> str:
    """The original GAN's samples beside those after the best removal of each metric (this seed)."""
    from safetensors.torch import load_file

    parts = study_dir / "parts"
    panels: dict[str, list[str]] = {retrain_key(seed): []}
    for metric in _unique(r["eval_metric"] for r in scored(rows)):
        cands = [r for r in rows if r["seed"] == seed and r["eval_metric"] == metric and r["n_removed"] > 0]
        if cands:
            b = max(cands, key=lambda r: direction(metric) * r["delta"])
            key = retrain_key(seed, f"{b['method']}-{b['score_metric']}", b["removal_rate"])
            panels.setdefault(key, []).append(f"best for {_label(metric)}: {b['method']}-{b['score_metric']} "
                                              f"removing {_rate(b['removal_rate'])} ({b['delta']:+.3g})")
    titles = {k: "original GAN (nothing removed)" if k == retrain_key(seed) else "; ".join(v)
              for k, v in panels.items()}
    samples = {k: load_file(str(p))["samples"].double().numpy()
               for k in panels if (p := parts / f"{k}.samples.safetensors").is_file()}
    cards = [_note(f"{k}.samples.safetensors is missing ({titles[k]}).") for k in panels if k not in samples]
    if not samples:
        return "".join(cards)
    first = next(iter(samples.values()))
    if as_images(first) is not None:
        cards += [figure(grid_png(as_images(s)), titles[k], escape(titles[k]), pixels=True)
                  for k, s in samples.items()]
    elif first.shape[1:] == (2,):
        real = _training_data(study_dir / "seeds" / f"seed_{seed}" / "run")
        both = np.concatenate([real, *samples.values()])
        pad = 0.05 * (both.max(0) - both.min(0))
        lo, hi = both.min(0) - pad, both.max(0) + pad
        for k, s in samples.items():
            fig, ax = new_axes(4.2, 4.2)
            ax.scatter(real[:, 0], real[:, 1], s=dot(len(real)), color="#b8bec9", label="training data")
            ax.scatter(s[:, 0], s[:, 1], s=14, color="#d9480f", label="generated")
            ax.set(xlim=(lo[0], hi[0]), ylim=(lo[1], hi[1]))
            ax.legend(fontsize=8, loc="upper right")
            cards.append(figure(png(fig), titles[k], escape(titles[k])))
    else:
        return _note(f"No picture for samples of shape {tuple(first.shape[1:])}.")
    return f'<div class="row">{"".join(cards)}</div>'


def _config_text(path: Path) -> str:
    return f"<pre>{escape(path.read_text())}</pre>" if path.is_file() else _note(f"{path.name} is missing.")
