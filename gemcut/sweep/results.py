"""What a sweep leaves in its study folder: trials.csv, best.yaml and report.html.

    python -m pytest -q tests/test_sweep.py

    rows = trial_rows(study)                       # one dict per trial: number, state, value, params, ...
    write_trials_csv(rows, study_dir / "trials.csv")
    write_best_config(base_raw, best.user_attrs["overrides"], study_dir / "best.yaml", run_dir=best_dir)
    write_report(study, rows, study_dir / "report.html", metric="val_loss", headline=None, best_dir=best_dir)

best.yaml is the base config with the best trial's keys applied, validated and written out whole (every
default resolved), so `gemcut train best.yaml` trains what the best trial trained. report.html is one file:
its pictures (the optimisation history and the parameter importances, Optuna's matplotlib plots) are inline
PNGs, nothing is fetched from elsewhere.
"""

from __future__ import annotations

import base64
import copy
import csv
import html
import io
from pathlib import Path

import optuna
import yaml

from gemcut.config import RunConfig, apply_overrides

COLUMNS = ("number", "state", "value", "last_step", "seconds", "run_dir", "error")


def trial_rows(study: optuna.Study) -> list[dict]:
    """One row per trial, oldest first; each swept key a column of its own (empty where `when` skipped it)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        rows.append({"number": t.number, "state": t.state.name, "value": t.value,
                     "last_step": t.user_attrs.get("last_step"), "seconds": round(seconds, 1) if seconds is not None else None,
                     "run_dir": t.user_attrs.get("run_dir"), "error": t.user_attrs.get("error"), **t.params})
    return rows


def param_keys(rows: list[dict]) -> list[str]:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in COLUMNS and k not in keys]
    return keys


def write_trials_csv(rows: list[dict], path: Path) -> Path:
    columns = ["number", "state", "value", *param_keys(rows), "last_step", "seconds", "run_dir", "error"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return path


def best_config(base_raw: dict, overrides: list[str]) -> RunConfig:
    """The base config with the best trial's `key=value` overrides applied, validated."""
    return RunConfig.model_validate(apply_overrides(copy.deepcopy(base_raw), list(overrides)))


def write_best_config(base_raw: dict, overrides: list[str], path: Path, *, run_dir: Path | None = None) -> Path:
    config = best_config(base_raw, overrides)
    head = ["# The best trial's config: the sweep's base config with these keys applied (gemcut sweep).",
            *(f"#   {o}" for o in overrides)]
    if run_dir is not None:
        head.append(f"# Its run folder: {run_dir}")
    path.write_text("\n".join(head) + "\n" + config.to_yaml(), encoding="utf-8")
    return path


def _png(figure_fn) -> str | None:
    """A matplotlib plot as a data: URL, or None when the study cannot draw it yet (too few trials)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        ax = figure_fn()
    except (ValueError, RuntimeError, ZeroDivisionError):
        plt.close("all")
        return None
    fig = ax.figure if hasattr(ax, "figure") else ax.flatten()[0].figure
    fig.set_size_inches(7, 4)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_report(study: optuna.Study, rows: list[dict], path: Path, *, metric: str, headline: dict | None,
                 best_dir: Path | None) -> Path:
    """report.html: the headline (best trial and its eval), the pictures, the table of trials."""
    import warnings

    from optuna.visualization import matplotlib as plots

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna's matplotlib plots are marked experimental
        complete = [r for r in rows if r["state"] == "COMPLETE"]
        history = _png(lambda: plots.plot_optimization_history(study)) if complete else None
        importances = _png(lambda: plots.plot_param_importances(study)) if len(complete) >= 2 else None
    states = {}
    for r in rows:
        states[r["state"]] = states.get(r["state"], 0) + 1
    keys = param_keys(rows)
    parts = [f"<h1>Sweep {html.escape(study.study_name)}</h1>",
             f"<p>{len(rows)} trials: {html.escape(', '.join(f'{n} {s.lower()}' for s, n in sorted(states.items())))}. "
             f"Watched: {html.escape(metric)} ({study.direction.name.lower()}).</p>"]
    if complete:
        best = study.best_trial
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in best.params.items())
        parts.append(f"<h2>Best trial: {best.number}</h2><p>{html.escape(metric)} = {_fmt(best.value)} with "
                     f"{html.escape(params) or 'the base config'}; run folder <code>{html.escape(str(best_dir))}</code>; "
                     "config <code>best.yaml</code>.</p>")
        if headline:
            parts.append(f"<p>Evaluation on the {html.escape(str(headline.get('split')))} split "
                         f"({_fmt(headline.get('n_examples'))} examples): <b>{html.escape(str(headline.get('text')))}</b></p>")
        else:
            parts.append("<p>The best trial has not been evaluated (gemcut sweep --no-eval, or its eval failed).</p>")
    for title, png in (("Optimisation history", history), ("Parameter importances", importances)):
        if png:
            parts.append(f"<h2>{title}</h2><img alt='{title}' src='{png}'>")
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["trial", "state", "value", *keys, "last step", "seconds", "error"])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in
                                    ["number", "state", "value", *keys, "last_step", "seconds", "error"]) + "</tr>"
                   for r in rows)
    parts.append(f"<h2>Trials</h2><table><tr>{head}</tr>{body}</table>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}table{border-collapse:collapse;"
             "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}code{font-size:12px}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>Sweep {html.escape(study.study_name)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    path.write_text(page, encoding="utf-8")
    return path


def study_yaml_summary(study: optuna.Study) -> str:
    """The study's own record (what it sweeps) as YAML: `gemcut sweep status` prints it above the table."""
    return yaml.safe_dump(dict(study.user_attrs), sort_keys=True)
