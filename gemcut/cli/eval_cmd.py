"""`gemcut eval RUN` and `gemcut compare RUN_A RUN_B`: print the tables, write the HTML reports.

    gemcut eval runs/<name> [eval.key=value ...] [--split test] [--checkpoint final|best|last|step-N] [--base/--no-base]
                            [--max-examples N] [--forgetting-data FILE_OR_ALIAS]
    gemcut eval runs/<name> --select-checkpoint [--metric macro_f1]
    gemcut compare runs/a runs/b [--out compare.html]
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from gemcut.cli import TRUST_REMOTE_CODE_HELP, app

console = Console()


@contextlib.contextmanager
def progress_bars():
    """A rich progress bar per scoring pass (tuned, base, forgetting, each checkpoint): the `progress` hook of evaluate."""
    bars = Progress(TextColumn("{task.description:<32}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, transient=False, disable=not console.is_terminal)

    def stage(name: str, total: int):
        task = bars.add_task(name, total=total)
        return lambda n: bars.advance(task, n)

    with bars:
        yield stage


def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    return str(x) if isinstance(x, int) else f"{x:.{digits}f}"


def _metrics_table(ev: dict) -> Table:
    from gemcut.eval.report import METRIC_ORDER

    has_base = ev.get("base") is not None
    table = Table(title=f"{ev['task']} · {ev['split']} · {ev['n_examples']} examples")
    table.add_column("metric")
    if has_base:
        table.add_column("base", justify="right")
    table.add_column("tuned", justify="right")
    if has_base:
        table.add_column("tuned − base", justify="right")
        table.add_column("95% interval", justify="right")
    for name in METRIC_ORDER:
        if name not in ev["tuned"]:
            continue
        row = [name]
        if has_base:
            row.append(_fmt(ev["base"].get(name)))
        row.append(_fmt(ev["tuned"].get(name)))
        if has_base:
            d = (ev.get("deltas") or {}).get(name) or {}
            good = d.get("diff") is not None and d["diff"] != 0 and ((d["diff"] > 0) == d.get("higher_is_better", True))
            color = "green" if good else ("red" if d.get("diff") else "")
            row.append(f"[{color}]{d['diff']:+.4f}[/]" if d.get("diff") is not None and color else _fmt(d.get("diff")))
            row.append(f"[{_fmt(d.get('low'))}, {_fmt(d.get('high'))}]" if d.get("low") is not None else "")
        table.add_row(*row)
    return table


@app.command("eval")
def eval_command(
    run: Path = typer.Argument(..., help="Run folder (runs/<name>)."),
    overrides: list[str] = typer.Argument(None, help="eval.key=value overrides of the run's eval settings (e.g. eval.forgetting_data=none)."),
    split: str = typer.Option(None, "--split", help="Prepared split to evaluate: test or validation (default: the run's eval.split)."),
    checkpoint: str = typer.Option("final", "--checkpoint", help="final, best, last or step-N."),
    base: bool | None = typer.Option(None, "--base/--no-base", help="Also evaluate the base model (default: the run's eval.compare_base)."),
    max_examples: int | None = typer.Option(None, "--max-examples", min=1, help="Evaluate only the first N examples."),
    forgetting_data: str | None = typer.Option(None, "--forgetting-data", help="General held-out set for the forgetting check (file or packaged alias; default: the run's eval.forgetting_data)."),
    select: bool = typer.Option(False, "--select-checkpoint", help="Evaluate every kept checkpoint on validation and mark the best."),
    metric: str | None = typer.Option(None, "--metric", help="With --select-checkpoint: the metric that decides (default: train.early_stopping.metric)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP),
) -> None:
    """Evaluate a run: tuned vs base with confidence intervals, forgetting check, eval.json and report.html."""
    from gemcut.eval.checkpoint_choice import select_checkpoint
    from gemcut.eval.evaluate import evaluate, run_config

    def log(msg: str) -> None:
        console.print(f"[dim]{msg}[/]", highlight=False)

    cfg = run_config(run, trust_remote_code, overrides)
    if select:
        with progress_bars() as stage:
            out = select_checkpoint(run, metric, split=split or "validation", max_examples=max_examples, log=log, progress=stage,
                                    trust_remote_code=trust_remote_code, overrides=overrides)
        table = Table(title=f"checkpoints on {out['split']} by {out['metric']} ({'higher' if out['higher_is_better'] else 'lower'} is better)")
        for col in ("checkpoint", out["metric"], ""):
            table.add_column(col)
        for r in out["checkpoints"]:
            marks = [m for m, on in (("best", r["best"]), ("final/", r["step"] == out["final_step"]),
                                     ("loop's best", r["name"] == out["loop_best"])) if on]
            table.add_row(r["name"], _fmt(r["value"]), ", ".join(marks))
        console.print(table)
        held = f"step-{out['final_step']}" if out["final_step"] is not None else "an unrecorded step"
        console.print(f"best: [bold]{out['best']}[/]; final/ holds {held}"
                      + ("" if out["final_is_best"] in (None, True) else f" — evaluate the best with --checkpoint {out['best']}"))
        console.print(f"written: {Path(run) / 'checkpoints.json'}")
        return
    with progress_bars() as stage:
        ev = evaluate(run, split=split or cfg.eval.split, checkpoint=checkpoint, base=cfg.eval.compare_base if base is None else base,
                      max_examples=max_examples, forgetting_data=forgetting_data, log=log, progress=stage,
                      trust_remote_code=trust_remote_code, overrides=overrides)
    console.print(_metrics_table(ev))
    for w in ev.get("warnings") or []:
        console.print(f"[yellow]warning:[/] {w}", highlight=False)
    f = ev.get("forgetting") or {}
    if f.get("perplexity_base") is not None:
        console.print(f"forgetting check: general perplexity {f['perplexity_base']:.2f} -> {f['perplexity_tuned']:.2f} "
                      f"({f['relative_change']:+.1%}) on {f['data']}", highlight=False)
        if f.get("task"):
            t = f["task"]
            console.print(f"forgetting check: general {t['metric'].replace('_', ' ')} {t['base']:.3f} -> {t['tuned']:.3f}",
                          highlight=False)
    console.print(f"[bold]{ev['headline']}[/]", highlight=False)
    console.print(f"report: {Path(run) / 'report.html'}", highlight=False)


@app.command("compare")
def compare_command(
    run_a: Path = typer.Argument(..., help="First run folder."),
    run_b: Path = typer.Argument(..., help="Second run folder."),
    out: Path = typer.Option(Path("compare.html"), "--out", help="Where to write the HTML page."),
) -> None:
    """Put two runs' tuned models side by side: a table (B − A with paired intervals) and compare.html."""
    from gemcut.eval.compare import compare

    result = compare(run_a, run_b, out=out, log=lambda m: console.print(f"[dim]{m}[/]", highlight=False))
    table = Table(title=f"{result['task']}: B − A" + ("" if result["paired"] else f" (no intervals: {result['why_unpaired']})"))
    for col in ("metric", str(run_a), str(run_b), "B − A", "95% interval"):
        table.add_column(col)
    for r in result["rows"]:
        interval = f"[{_fmt(r['low'])}, {_fmt(r['high'])}]" if r["low"] is not None else ""
        table.add_row(r["metric"], _fmt(r["a"]), _fmt(r["b"]), _fmt(r["diff"]), interval)
    console.print(table)
    console.print(f"written: {result['html']}", highlight=False)
