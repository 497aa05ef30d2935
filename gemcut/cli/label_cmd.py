"""`gemcut generate`, `gemcut label`, `gemcut label export`: collect human preferences.

    gemcut generate runs/sft-1 prompts.jsonl --n 4 --seed 0     # K completions per prompt into the queue
    gemcut label --port 8700                                     # the ranking page on http://127.0.0.1:8700/label/
    gemcut label export --out prefs.jsonl [--format openai]      # ranked pairs for reward/DPO training

All three use one database: `--db URL` (SQLAlchemy), by default the SQLite file gemcut_home()/gemcut.db.
"""

from __future__ import annotations

import typer

from gemcut.cli import TRUST_REMOTE_CODE_HELP, app

label_app = typer.Typer(help="The ranking page and the export of rankings as preference pairs.", invoke_without_command=True,
                        no_args_is_help=False)
app.add_typer(label_app, name="label")

DB_HELP = "Database URL (SQLAlchemy), e.g. sqlite:///labels.db; default: the SQLite file in gemcut's home folder."


def _store(db: str | None, **kwargs):
    from gemcut.label.store import LabelStore

    return LabelStore(db, **kwargs)


@app.command("generate")
def generate_cmd(run_or_model: str = typer.Argument(..., help="A run folder, a local model folder or a model alias."),
                 prompts: str = typer.Argument(..., help="JSONL of {prompt} / {messages} / {text} objects."),
                 n: int = typer.Option(4, "--n", min=2, help="Completions sampled per prompt."),
                 temperature: float = typer.Option(1.0, min=0.0, help="Sampling temperature (> 0)."),
                 top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass."),
                 seed: int = typer.Option(0, help="Seed: the same command queues the same completions."),
                 max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1, help="Tokens per completion at most."),
                 batch_size: int = typer.Option(16, "--batch-size", min=1, help="Sequences per generation batch."),
                 db: str = typer.Option(None, "--db", help=DB_HELP),
                 trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP)) -> None:
    """Sample N completions of each prompt and put them in the labeling queue."""
    from gemcut.label.generate import load_generator, queue_completions, read_prompts

    items = read_prompts(prompts)  # fail on a bad file before loading the model
    model, tokenizer, template = load_generator(run_or_model, trust_remote_code)
    counts = queue_completions(_store(db), model, tokenizer, template, items, n=n, temperature=temperature, top_p=top_p,
                               seed=seed, max_new_tokens=max_new_tokens, model_name=run_or_model, batch_size=batch_size)
    typer.echo(f"queued {counts['queued']} of {counts['prompts']} prompts ({counts['completions']} completions); "
               f"{counts['duplicates_dropped']} duplicate or empty completions dropped, {counts['prompts_skipped']} prompts skipped")
    for line in counts["skipped"][:10]:
        typer.echo(f"  skipped {line}")


@label_app.callback()
def label_cmd(ctx: typer.Context,
              db: str = typer.Option(None, "--db", help=DB_HELP),
              host: str = typer.Option("127.0.0.1", help="Interface to bind; beyond loopback it needs --keys."),
              port: int = typer.Option(8700, help="TCP port."),
              allowed_host: list[str] = typer.Option(None, "--allowed-host", help="Another name the page is reached by (repeatable); other Host headers get 400."),
              keys: str = typer.Option(None, "--keys", help="File of `name:key` lines: labelers then sign in with their key."),
              lease_minutes: float = typer.Option(15, "--lease-minutes", min=0.1, help="How long a prompt stays with a labeler who does not answer."),
              rankings_per_prompt: int = typer.Option(1, "--rankings-per-prompt", min=1, help="Labelers who rank each prompt.")) -> None:
    """Serve the ranking page on http://HOST:PORT/label/ (or run `gemcut label export`)."""
    ctx.obj = {"db": db}
    if ctx.invoked_subcommand is not None:
        return
    import uvicorn

    from gemcut.label.app import create_app, read_keys
    from gemcut.netguard import uvicorn_log_config

    store = _store(db, lease_seconds=int(lease_minutes * 60), rankings_per_prompt=rankings_per_prompt)
    application = create_app(store, read_keys(keys) if keys else None, host=host, allowed_hosts=allowed_host or ())
    progress = store.progress()
    typer.echo(f"{progress['prompts']} prompts, {progress['ranked']} ranked; ranking page: http://{host}:{port}/label/")
    uvicorn.run(application, host=host, port=port, log_level="warning", log_config=uvicorn_log_config())


@label_app.command("export")
def export_cmd(ctx: typer.Context, out: str = typer.Option(..., "--out", help="Output JSONL file."),
               fmt: str = typer.Option("gemcut", "--format", help="gemcut (preference records with labeler and time) or openai (DPO)."),
               db: str = typer.Option(None, "--db", help=DB_HELP)) -> None:
    """Write every ranking as preference pairs (all ordered pairs of each ranking)."""
    from gemcut.label.export import export_preferences

    counts = export_preferences(_store(db or (ctx.obj or {}).get("db")), out, fmt)  # type: ignore[arg-type]
    typer.echo(f"wrote {counts['pairs']} pairs from {counts['rankings']} rankings to {counts['path']} ({counts['format']} format)")
