"""Two runs side by side: `gemcut compare RUN_A RUN_B` -> a table and compare.html.

    gemcut compare runs/a runs/b [--out compare.html]

Each run's eval.json is read (a run without one is evaluated first, with its own defaults). When both
evaluations scored the same examples in the same order (same split, same sources) the differences B − A
get a paired bootstrap interval from the per-example answers in `eval_predictions.jsonl`; otherwise the
table shows the two values and says why there is no interval. The page shows the metrics table, both
runs' loss curves on one plot, and both confusion matrices.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from gemcut.errors import GemcutError
from gemcut.eval.report import METRIC_ORDER, confusion_uri, esc, fmt, img, new_figure, page, png_data_uri, read_metrics_log
from gemcut.eval.summary import LOWER_IS_BETTER, ModelResults, metric_functions


def load_eval(run_dir: Path, log: Callable[[str], None]) -> dict:
    path = Path(run_dir) / "eval.json"
    if not path.is_file():
        if not (Path(run_dir) / "config.yaml").is_file():
            raise GemcutError(f"{run_dir}: not a run folder (no config.yaml)")
        from gemcut.eval.evaluate import evaluate

        log(f"{run_dir} has no eval.json yet: evaluating it")
        return evaluate(run_dir, log=log)
    return json.loads(path.read_text())


def _predictions(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "eval_predictions.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _tuned_results(lines: list[dict]) -> ModelResults:
    r = ModelResults()
    first = lines[0]
    if "tuned_label" in first:
        r.predictions = [x["tuned_label"] for x in lines]
    if "tuned_text" in first:
        r.texts = [x["tuned_text"] for x in lines]
    if "tuned_nll" in first:
        r.nll = [(x["tuned_nll"], x["tuned_tokens"]) for x in lines]
    if "tuned_chosen" in first:
        r.chosen, r.rejected = [x["tuned_chosen"] for x in lines], [x["tuned_rejected"] for x in lines]
    return r


def compare(run_a, run_b, *, out: str | Path | None = None, n_resamples: int = 1000, seed: int = 0,
            log: Callable[[str], None] | None = None) -> dict:
    """Compare the tuned models of two runs; writes `out` (default ./compare.html) and returns the table.

    Returns {a, b, task, paired (bool), why_unpaired, rows: [{metric, a, b, diff, low, high, higher_is_better}], html}.
    """
    from gemcut.eval.bootstrap import paired_bootstrap_indexed

    log = log or (lambda _m: None)
    run_a, run_b = Path(run_a), Path(run_b)
    ev_a, ev_b = load_eval(run_a, log), load_eval(run_b, log)
    pred_a, pred_b = _predictions(run_a), _predictions(run_b)
    why = None
    if ev_a["task"] != ev_b["task"]:
        why = f"different tasks ({ev_a['task']} vs {ev_b['task']})"
    elif not pred_a or not pred_b:
        why = "eval_predictions.jsonl missing in one run"
    elif [x["source"] for x in pred_a] != [x["source"] for x in pred_b] or [x["reference"] for x in pred_a] != [x["reference"] for x in pred_b]:
        why = "the two evaluations scored different examples"
    fns_a = fns_b = {}
    if why is None:
        refs = [x["reference"] for x in pred_a]
        labels = ev_a.get("labels") or ev_b.get("labels") or []
        if set(labels) != set(ev_b.get("labels") or labels):
            why = "different label sets"
        else:
            fns_a = metric_functions(ev_a["task"], refs, labels, _tuned_results(pred_a))
            fns_b = metric_functions(ev_b["task"], refs, labels, _tuned_results(pred_b))
    rows = []
    for name in METRIC_ORDER:
        va, vb = ev_a["tuned"].get(name), ev_b["tuned"].get(name)
        if va is None and vb is None:
            continue
        row = {"metric": name, "a": va, "b": vb, "diff": (vb - va) if va is not None and vb is not None else None,
               "low": None, "high": None, "higher_is_better": name not in LOWER_IS_BETTER}
        if name in fns_a and name in fns_b:
            ci = paired_bootstrap_indexed(fns_b[name], fns_a[name], len(pred_a), n_resamples=n_resamples, seed=seed)
            row.update(diff=ci["diff"], low=ci["low"], high=ci["high"])
        rows.append(row)
    result = {"a": str(run_a), "b": str(run_b), "task": ev_a["task"], "paired": why is None, "why_unpaired": why,
              "headline_a": ev_a.get("headline"), "headline_b": ev_b.get("headline"), "rows": rows}
    out = Path(out) if out is not None else Path.cwd() / "compare.html"
    out.write_text(render_compare(result, ev_a, ev_b, read_metrics_log(run_a), read_metrics_log(run_b)), encoding="utf-8")
    result["html"] = str(out)
    return result


def _curves_uri(log_a: list[dict], log_b: list[dict], name_a: str, name_b: str) -> str | None:
    series = []
    for log, name, color in ((log_a, name_a, "#4c72b0"), (log_b, name_b, "#dd8452")):
        for key, style in (("loss", "-"), ("val_loss", "o--")):
            pts = [(r["step"], r[key]) for r in log if isinstance(r.get(key), (int, float)) and "step" in r]
            if pts:
                series.append((pts, f"{name} {'training' if key == 'loss' else 'validation'}", color, style))
    if not series:
        return None
    fig, ax = new_figure()
    for pts, label, color, style in series:
        ax.plot(*zip(*pts), style, label=label, color=color, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    return png_data_uri(fig)


def render_compare(result: dict, ev_a: dict, ev_b: dict, log_a: list[dict], log_b: list[dict]) -> str:
    name_a, name_b = Path(result["a"]).name, Path(result["b"]).name
    if name_a == name_b:
        name_a, name_b = f"A ({name_a})", f"B ({name_b})"
    rows = []
    for r in result["rows"]:
        interval = f"[{fmt(r['low'])}, {fmt(r['high'])}]" if r["low"] is not None else ""
        rows.append(f'<tr><th>{esc(r["metric"])}</th><td class="num" data-metric="{r["metric"]}" data-run="a">{fmt(r["a"])}</td>'
                    f'<td class="num" data-metric="{r["metric"]}" data-run="b">{fmt(r["b"])}</td>'
                    f'<td class="num" data-metric="{r["metric"]}" data-run="diff">{fmt(r["diff"])}</td><td class="num">{interval}</td></tr>')
    note = "" if result["paired"] else f"<p>No intervals: {esc(result['why_unpaired'])}.</p>"
    parts = [f"<h1>gemcut compare: {esc(name_a)} vs {esc(name_b)}</h1>",
             f"<p>A: {esc(result['headline_a'])}<br>B: {esc(result['headline_b'])}</p>",
             "<h2>Tuned models</h2>", note,
             f'<table class="metrics"><tr><th>metric</th><th>{esc(name_a)}</th><th>{esc(name_b)}</th><th>B − A</th>'
             f'<th>95% interval</th></tr>{"".join(rows)}</table>']
    curve = _curves_uri(log_a, log_b, name_a, name_b)
    if curve:
        parts += ["<h2>Training</h2>", img(curve, "loss curves of both runs")]
    pics = [img(u, f"{n} confusion matrix") for n, ev in ((name_a, ev_a), (name_b, ev_b))
            if (conf := ev["tuned"].get("confusion")) and (u := confusion_uri(conf, f"{n}: tuned"))]
    if pics:
        parts += ["<h2>Confusion matrices</h2>", " ".join(pics)]
    return page(f"gemcut compare {name_a} {name_b}", "\n".join(p for p in parts if p))
