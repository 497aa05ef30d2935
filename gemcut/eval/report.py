"""report.html: one self-contained page a person reads offline (no scripts, no external files).

    gemcut eval runs/<name>          # writes runs/<name>/report.html
    python -c "from gemcut.eval.report import write_report; import json; write_report('runs/x', json.load(open('runs/x/eval.json')))"

Sections: the headline (the margin over the best baseline, or base -> tuned, with its interval), warnings, the
baselines beside the tuned model (baseline_summary.py), a metrics table
(base, tuned, difference, confidence interval), training and validation loss curves from metrics.jsonl,
the confusion matrices as pictures (with the "unparseable" column), the per-class table, how generated
answers were mapped to labels, the forgetting check, and side-by-side samples. Pictures are matplotlib
PNGs embedded as base64 `data:` URIs. Every number cell carries `data-metric`/`data-model` attributes, so
tests (and scripts) can read the values back from the HTML.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

from gemcut.eval.per_source import per_source_section

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
.headline{font-size:1.6em;font-weight:600;margin:.5em 0}.meta{color:#666}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f5f5f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
.warn{background:#fff4e5;border-left:4px solid #f0a020;padding:.5em 1em;margin:.5em 0}
.good{color:#1a7f37}.bad{color:#c62828}.samples td{max-width:320px;white-space:pre-wrap;word-break:break-word}
"""


def esc(x) -> str:
    return html.escape("" if x is None else str(x))


def fmt(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}f}"


def png_data_uri(fig) -> str:
    """Render a matplotlib figure as a base64 PNG data URI and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{esc(alt)}">'


def page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n")


def new_figure(width=6.0, height=3.5):
    """(figure, axes) of a matplotlib figure `width` x `height` inches, drawn off-screen (the Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def read_metrics_log(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a killed process; the rest of the curve is still worth drawing
    return out


def loss_curve_uri(records: list[dict], title: str = "loss") -> str | None:
    """Training loss and validation loss against the optimizer step, or None when nothing was logged."""
    train = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), (int, float)) and "step" in r]
    val = [(r["step"], r["val_loss"]) for r in records if isinstance(r.get("val_loss"), (int, float)) and "step" in r]
    if not train and not val:
        return None
    fig, ax = new_figure()
    if train:
        ax.plot(*zip(*train), label="training loss", color="#4c72b0", linewidth=1)
    if val:
        ax.plot(*zip(*val), label="validation loss", color="#dd8452", marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    return png_data_uri(fig)


def confusion_uri(confusion: dict, title: str) -> str | None:
    """The confusion matrix (rows: true labels, columns: predicted labels + unparseable) as a heat map."""
    matrix = confusion.get("matrix") or []
    if not matrix:
        return None
    import numpy as np

    m = np.asarray(matrix)
    labels, columns = confusion["labels"], confusion["columns"]
    fig, ax = new_figure(1.2 + 0.8 * len(columns), 1.0 + 0.7 * len(labels))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(columns)), labels=columns, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels=labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    peak = m.max() if m.size else 0
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", color="white" if m[i, j] > peak / 2 else "black")
    return png_data_uri(fig)


METRIC_ORDER = ["macro_f1", "accuracy", "weighted_f1", "macro_precision", "macro_recall", "weighted_precision",
                "weighted_recall", "unparseable", "unparseable_rate", "exact_match", "rouge1", "rouge2", "rougeL", "bleu",
                "perplexity", "loss", "pairwise_accuracy"]


def metrics_table(ev: dict) -> str:
    tuned, base, deltas = ev["tuned"], ev.get("base") or {}, ev.get("deltas") or {}
    names = [n for n in METRIC_ORDER if n in tuned]
    rows = []
    for n in names:
        d = deltas.get(n)
        diff = ci = ""
        if d is not None and d.get("diff") is not None:
            good = (d["diff"] > 0) == d.get("higher_is_better", True)
            cls = "good" if good and d["diff"] != 0 else ("bad" if d["diff"] != 0 else "")
            diff = f'<td class="num {cls}" data-metric="{n}" data-model="delta">{d["diff"]:+.4f}</td>'
            ci = (f'<td class="num" data-metric="{n}" data-model="ci">[{fmt(d["low"])}, {fmt(d["high"])}]</td>'
                  if d.get("low") is not None else "<td></td>")
        else:
            diff, ci = "<td></td>", "<td></td>"
        rows.append(f'<tr><th>{esc(n)}</th><td class="num" data-metric="{n}" data-model="base">{fmt(base.get(n))}</td>'
                    f'<td class="num" data-metric="{n}" data-model="tuned">{fmt(tuned.get(n))}</td>{diff}{ci}</tr>')
    conf = next((d.get("confidence") for d in deltas.values() if d.get("confidence")), 0.95)
    head = f"<tr><th>metric</th><th>base</th><th>tuned</th><th>tuned − base</th><th>{int(conf * 100)}% interval</th></tr>"
    return f'<table class="metrics">{head}{"".join(rows)}</table>'


def per_class_table(ev: dict) -> str:
    tuned, base = ev["tuned"].get("per_class") or {}, (ev.get("base") or {}).get("per_class") or {}
    if not tuned:
        return ""
    head = "<tr><th>class</th><th>support</th>" + "".join(
        f"<th>{m} ({who})</th>" for m in ("precision", "recall", "f1") for who in (("base", "tuned") if base else ("tuned",))) + "</tr>"
    rows = []
    for lab, t in tuned.items():
        cells = [f'<th>{esc(lab)}</th><td class="num">{t["support"]}</td>']
        for m in ("precision", "recall", "f1"):
            if base:
                cells.append(f'<td class="num" data-class="{esc(lab)}" data-metric="{m}" data-model="base">{fmt(base[lab][m])}</td>')
            cells.append(f'<td class="num" data-class="{esc(lab)}" data-metric="{m}" data-model="tuned">{fmt(t[m])}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="per-class">{head}{"".join(rows)}</table>'


def mapping_table(ev: dict) -> str:
    rows = []
    for who in ("base", "tuned"):
        m = (ev.get(who) or {}).get("label_mapping")
        if m:
            rows.append(f"<tr><th>{who}</th>" + "".join(f'<td class="num" data-rule="{esc(k)}" data-model="{who}">{v}</td>'
                                                         for k, v in m.items()) + "</tr>")
    if not rows:
        return ""
    keys = next(iter((ev.get(w) or {}).get("label_mapping") for w in ("tuned", "base") if (ev.get(w) or {}).get("label_mapping")))
    head = "<tr><th></th>" + "".join(f"<th>{esc(k)}</th>" for k in keys) + "</tr>"
    return ("<h2>How answers were mapped to labels</h2><p>exact, then case-insensitive, then first word, then a single "
            "label contained in the answer; anything else is <b>unparseable</b> and counts as wrong.</p>"
            f'<table class="mapping">{head}{"".join(rows)}</table>')


def baselines_section(ev: dict) -> str:
    """The tuned model beside each baseline (base prompted zero- and k-shot, TF-IDF, the free-text base) on the
    headline metric and accuracy, with tuned minus baseline and its interval; the strongest one marked."""
    found, skipped = ev.get("baselines") or {}, ev.get("baselines_skipped") or {}
    if not found and not skipped:
        return ""
    metric = ev.get("headline_metric") or "macro_f1"
    shown = [m for m in dict.fromkeys([metric, "accuracy", "exact_match", "bleu"]) if m in ev["tuned"]]
    best = (ev.get("best_baseline") or {}).get("name")
    rows = [(name, b["title"], b["how"], b["metrics"], b["deltas"]) for name, b in found.items()]
    if ev.get("base") is not None and not any(b["info"].get("same_as") == "base" for b in found.values()):
        rows.append(("base", "base (free text)", "the base model's generated answer, mapped to a label (section below)",
                     ev["base"], ev.get("deltas") or {}))
    head = ("<tr><th>model</th><th>how it answers</th>" + "".join(f"<th>{esc(m)}</th>" for m in shown)
            + f"<th>tuned − it ({esc(metric)})</th><th>95% interval</th></tr>")
    body = ['<tr><th>tuned</th><td>the fine-tuned model</td>'
            + "".join(f'<td class="num" data-metric="{m}" data-model="tuned">{fmt(ev["tuned"].get(m))}</td>' for m in shown)
            + "<td></td><td></td></tr>"]
    for name, title, how, metrics, deltas in rows:
        d = deltas.get(metric) or {}
        mark = " <b>(best)</b>" if name == best else ""
        interval = f"[{fmt(d.get('low'))}, {fmt(d.get('high'))}]" if d.get("low") is not None else ""
        body.append(f"<tr><th>{esc(title)}{mark}</th><td>{esc(how)}</td>"
                    + "".join(f'<td class="num" data-metric="{m}" data-model="baseline:{esc(name)}">{fmt(metrics.get(m))}</td>'
                              for m in shown)
                    + f'<td class="num" data-metric="{metric}" data-model="delta:{esc(name)}">{fmt(d.get("diff"))}</td>'
                    f'<td class="num">{interval}</td></tr>')
    notes = "".join(f"<p>No {esc(name.replace('_', '-'))} baseline: {esc(why)}.</p>" for name, why in skipped.items())
    judge = ev.get("judge") or {}
    for name, w in (judge.get("vs") or {}).items():
        title = (found.get(name) or {}).get("title", name)
        interval = f" (interval [{fmt(w['low'], 2)}, {fmt(w['high'], 2)}])" if w.get("low") is not None else ""
        notes += (f"<p>Judge <code>{esc(judge['run'])}</code>: the tuned answer scores above {esc(title)}'s on "
                  f'<span data-metric="judge_win_rate" data-model="baseline:{esc(name)}">{fmt(w["win_rate"])}</span> of '
                  f"the prompts{interval}; {w['wins']} wins, {w['ties']} ties, {w['losses']} losses.</p>")
    return ("<h2>Baselines</h2><p>What the same data gives without fine-tuning; the headline is the margin over the "
            "strongest. Prompted baselines are scored by constrained label likelihood on label tasks, so they always "
            f"answer a label (docs/evaluation.md).</p>"
            f'<table class="baselines">{head}{"".join(body)}</table>{notes}')


def forgetting_section(ev: dict) -> str:
    f = ev.get("forgetting")
    if not f:
        return ""
    if f.get("skipped"):
        return f"<h2>Forgetting check</h2><p>Skipped: {esc(f['skipped'])}.</p>"
    d = f.get("delta") or {}
    ci = f" (interval [{fmt(d.get('low'))}, {fmt(d.get('high'))}])" if d.get("low") is not None else ""
    warn = f'<div class="warn">{esc(f["warning"])}</div>' if f.get("warning") else ""
    return (f"<h2>Forgetting check</h2><p>Perplexity on {f['n']} general held-out examples of <code>{esc(f['data'])}</code> "
            f"({f['tokens']} tokens): base <span data-metric=\"forgetting_perplexity\" data-model=\"base\">{fmt(f['perplexity_base'])}</span>, "
            f"tuned <span data-metric=\"forgetting_perplexity\" data-model=\"tuned\">{fmt(f['perplexity_tuned'])}</span>, "
            f"change {fmt((f.get('relative_change') or 0) * 100, 1)}%{ci}; the warning margin is {fmt(f['margin'] * 100, 0)}%.</p>"
            f"{forgetting_task_line(f.get('task'))}{warn}")


def forgetting_task_line(t: dict | None) -> str:
    if not t:
        return ""
    d = t.get("delta") or {}
    ci = f" (difference {d['diff']:+.3f}, interval [{fmt(d.get('low'))}, {fmt(d.get('high'))}])" if d.get("low") is not None else ""
    return (f"<p>Task {esc(t['metric'].replace('_', ' '))} on the same examples: "
            f"base <span data-metric=\"forgetting_{esc(t['metric'])}\" data-model=\"base\">{fmt(t['base'])}</span>, "
            f"tuned <span data-metric=\"forgetting_{esc(t['metric'])}\" data-model=\"tuned\">{fmt(t['tuned'])}</span>{ci}.</p>")


def samples_table(ev: dict) -> str:
    rows = ev.get("samples") or []
    if not rows:
        return ""
    body = "".join(f"<tr><td>{esc(r.get('prompt'))}</td><td>{esc(r.get('reference'))}</td><td>{esc(r.get('base'))}</td>"
                   f"<td>{esc(r.get('tuned'))}</td></tr>" for r in rows)
    return ('<h2>Samples</h2><table class="samples"><tr><th>prompt</th><th>reference</th><th>base</th><th>tuned</th></tr>'
            f"{body}</table>")


def render_report(ev: dict, metrics_log: list[dict]) -> str:
    """The whole report page for one eval.json dict and the run's metrics.jsonl records."""
    parts = [f"<h1>gemcut evaluation: {esc(Path(ev['run']).name)}</h1>",
             f'<p class="meta">task {esc(ev["task"])} · split {esc(ev["split"])} · checkpoint {esc(ev["checkpoint"])} · '
             f'{ev["n_examples"]} examples' + (f" ({ev['n_left_out']} of {ev['n_in_split']} left out by max_examples)" if ev.get("n_left_out") else "")
             + "</p>",
             f'<p class="headline" id="headline">{esc(ev["headline"])}</p>']
    parts += [f'<div class="warn">{esc(w)}</div>' for w in ev.get("warnings") or []]
    parts += [baselines_section(ev), "<h2>Metrics</h2>", metrics_table(ev)]
    curve = loss_curve_uri(metrics_log)
    parts.append("<h2>Training</h2>" + (img(curve, "training and validation loss") if curve else "<p>No metrics.jsonl in this run.</p>"))
    pics = []
    for who in ("base", "tuned"):
        conf = (ev.get(who) or {}).get("confusion")
        uri = confusion_uri(conf, f"{who}: confusion matrix") if conf else None
        if uri:
            pics.append(img(uri, f"{who} confusion matrix"))
    if pics:
        parts += ["<h2>Confusion matrix</h2>", " ".join(pics)]
    table = per_class_table(ev)
    if table:
        parts += ["<h2>Per class</h2>", table]
    parts += [mapping_table(ev), per_source_section(ev), forgetting_section(ev), samples_table(ev)]
    return page(f"gemcut eval {Path(ev['run']).name}", "\n".join(p for p in parts if p))


def write_report(run_dir, ev: dict) -> Path:
    """Write run_dir/report.html from an eval.json dict; returns its path."""
    run_dir = Path(run_dir)
    out = run_dir / "report.html"
    out.write_text(render_report(ev, read_metrics_log(run_dir)), encoding="utf-8")
    return out
