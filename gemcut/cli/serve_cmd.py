"""`gemcut serve|export|chat|monitor`: put a run in front of clients and watch it.

    gemcut export runs/my-run --merge --dtype bf16 --out exported/my-run
    gemcut export runs/my-run --format gguf --quantize q8_0     # + Ollama Modelfile
    gemcut export runs/my-run --format vllm
    GEMCUT_API_KEYS=secret gemcut serve --model runs/my-run --model runs/other-run --port 8000
    gemcut chat runs/my-run
    gemcut monitor --db sqlite:///runs/serve.db --run runs/my-run --since 7d
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import typer

from gemcut.cli import TRUST_REMOTE_CODE_HELP, app
from gemcut.errors import GemcutError


@app.command("serve")
def serve(
    model: list[str] = typer.Option(None, "--model", "-m", help="Run folder, exported folder or model name; repeat for several."),
    host: str = typer.Option(None, help="Interface to bind (default 127.0.0.1, loopback only)."),
    allowed_host: list[str] = typer.Option(None, "--allowed-host", help="Another name clients reach the server by (repeatable); other Host headers get 400."),
    port: int = typer.Option(None, help="TCP port (default 8000)."),
    config: Path | None = typer.Option(None, help="YAML file of serve settings (keys as in `ServeSettings`)."),
    api_key: list[str] = typer.Option(None, "--api-key", help="Accepted bearer key (repeatable); also read from $GEMCUT_API_KEYS."),
    db: str | None = typer.Option(None, help="SQLAlchemy URL of the request log (default sqlite:///runs/serve.db)."),
    log_prompts: bool = typer.Option(None, "--log-prompts/--no-log-prompts", help="Store prompt and answer text (needed for drift and data export)."),
    max_queue: int | None = typer.Option(None, help="Waiting requests before 429 (default 64)."),
    max_batch: int | None = typer.Option(None, help="Sequences per batch (default 8)."),
    max_batch_tokens: int | None = typer.Option(None, help="Tokens per classifier/embedding forward pass (default 8192)."),
    threads: int | None = typer.Option(None, help="torch CPU threads for the model worker."),
    max_body_bytes: int | None = typer.Option(None, help="Largest request body accepted, in bytes (default 8 MiB); bigger ones get 413."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP),
    workers: int | None = typer.Option(None, help="Fine-tuning job workers inside the server (default 1; 0: only `gemcut worker` processes run jobs)."),
    service_root: str | None = typer.Option(None, "--service-root", help="Folder of uploaded files and job runs, shared by all workers (default $GEMCUT_HOME/service)."),
    jobs_db: str | None = typer.Option(None, "--jobs-db", help="SQLAlchemy URL of the job store (default SQLite in the service root; postgresql+psycopg://... for several workers)."),
    max_upload_bytes: int | None = typer.Option(None, help="Largest file POST /v1/files accepts, in bytes (default 512 MiB)."),
) -> None:
    """Serve runs behind an OpenAI-compatible API (FastAPI on uvicorn), with the fine-tuning service:
    /v1/files, /v1/fine_tuning/jobs and the dashboard at /dashboard."""
    import uvicorn
    from sqlalchemy.engine import make_url

    from gemcut.netguard import uvicorn_log_config
    from gemcut.serve.settings import load_settings
    from gemcut.service.app import create_service_app
    from gemcut.service.settings import ServiceSettings

    settings = load_settings(config, cls=ServiceSettings, models=list(model) or None, host=host, allowed_hosts=allowed_host or None,
                             port=port, db_url=db, log_prompts=log_prompts,
                             max_queue=max_queue, max_batch=max_batch, max_batch_tokens=max_batch_tokens, num_threads=threads, max_body_bytes=max_body_bytes,
                             trust_remote_code=trust_remote_code or None, workers=workers, service_root=service_root,
                             jobs_db_url=jobs_db, max_upload_bytes=max_upload_bytes)
    if api_key:
        settings.api_keys = sorted(set(settings.api_keys) | set(api_key))
    if not settings.all_api_keys():
        # Never serve unauthenticated: make a key for this session and show it once.
        settings.api_keys = [secrets.token_urlsafe(24)]
        typer.echo(f"no API key configured; this session's key is: {settings.api_keys[0]}\n"
                   "(set GEMCUT_API_KEYS or pass --api-key to choose your own)")
    if settings.host not in ("127.0.0.1", "localhost", "::1"):
        typer.secho(f"warning: binding {settings.host} exposes the API beyond this machine", fg="yellow", err=True)
    application = create_service_app(settings)
    served = ", ".join(application.state.registry.models) or "no model yet (fine-tuned ones load on first call)"
    typer.echo(f"serving {served} on http://{settings.host}:{settings.port}/v1; dashboard: http://{settings.host}:{settings.port}/dashboard\n"
               f"fine-tuning: {settings.workers} worker(s) here, jobs in {settings.layout().root}, store {make_url(settings.jobs_db()).render_as_string(hide_password=True)}")
    uvicorn.run(application, host=settings.host, port=settings.port, log_level="info", log_config=uvicorn_log_config())


@app.command("export")
def export(
    run: Path = typer.Argument(..., help="Run folder (with final/)."),
    export_format: str = typer.Option("transformers", "--format", help="transformers (safetensors folder), gguf (llama.cpp, Ollama) or vllm (a folder vllm serve loads)."),
    merge: bool = typer.Option(True, "--merge/--no-merge", help="Merge LoRA into the base (default) or export the adapter alone."),
    dtype: str | None = typer.Option(None, help="Weights dtype of a merged transformers/vllm export: fp32 (transformers default) or bf16 (vllm default)."),
    quantize: str | None = typer.Option(None, help="transformers: int8 (gemcut's CPU format); gguf: f16 (default), bf16, q8_0 or q4_0."),
    out: Path | None = typer.Option(None, help="Output folder (default RUN/export/<kind>)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP),
) -> None:
    """Export a run: a merged transformers folder, a peft adapter, int8 for CPU, GGUF with an Ollama Modelfile,
    or a vLLM-ready folder (see docs/serving.md)."""
    if export_format == "gguf":
        from gemcut.export.gguf_export import export_gguf

        if dtype is not None:
            raise GemcutError("--dtype is for transformers and vllm exports; a GGUF's type is --quantize f16|bf16|q8_0|q4_0")
        folder = export_gguf(run, out, quantize=quantize or "f16", merge=merge, trust_remote_code=trust_remote_code)
        info = json.loads((folder / "export.json").read_text(encoding="utf-8"))
        for name, written in info["files"].items():
            typer.echo(f"exported {folder / name} ({written['bytes'] / 1e6:.1f} MB, {quantize or 'f16'})")
        if "modelfile" in info:
            typer.echo(f"ollama: ollama create {run.resolve().name} -f {folder / info['modelfile']}")
        else:
            typer.secho(f"warning: no Ollama Modelfile: {info['modelfile_error']}", fg="yellow", err=True)
        return
    if export_format == "vllm":
        from gemcut.export.vllm import README, export_vllm

        if quantize is not None:
            raise GemcutError("--quantize is not used by --format vllm (vLLM quantizes at load time); leave it out")
        folder = export_vllm(run, out, merge=merge, dtype=dtype or "bf16", trust_remote_code=trust_remote_code)
        typer.echo(f"exported a vLLM folder to {folder}; serve it with the command in {folder / README}")
        info = json.loads((folder / "export.json").read_text(encoding="utf-8"))
        if "warning" in info:
            typer.secho(f"warning: {info['warning']}", fg="yellow", err=True)
        return
    if export_format != "transformers":
        raise GemcutError(f"--format {export_format!r} is not known; use transformers, gguf or vllm")
    from gemcut.export.merge import export_run

    folder = export_run(run, out, merge=merge, dtype=dtype or "fp32", quantize=quantize, trust_remote_code=trust_remote_code)
    info = json.loads((folder / "export.json").read_text(encoding="utf-8"))
    typer.echo(f"exported {info['format']} to {folder} ({info['bytes']['weights'] / 1e6:.1f} MB of weights)")
    if "warning" in info:
        typer.secho(f"warning: {info['warning']}", fg="yellow", err=True)
    if "int8_report" in info:
        r = info["int8_report"]
        typer.echo(f"  size  {r['weights_bytes']['float32'] / 1e6:.1f} MB fp32 -> {r['weights_bytes']['int8'] / 1e6:.1f} MB int8")
        typer.echo(f"  speed {r['tokens_per_second']['float32']} -> {r['tokens_per_second']['int8']} tokens/s")
        q = r["quality"]
        typer.echo(f"  perplexity {q['perplexity_float32']} -> {q['perplexity_int8']}; top-1 agreement {q['top1_agreement']:.1%}")


@app.command("chat")
def chat(
    run: str = typer.Argument(..., help="Run folder, exported folder or model name."),
    max_tokens: int = typer.Option(256, help="Tokens per answer."),
    temperature: float = typer.Option(0.7, help="0 is greedy."),
    top_p: float = typer.Option(0.9),
    system: str | None = typer.Option(None, help="System message."),
    seed: int | None = typer.Option(None),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP),
) -> None:
    """Talk to a model in the terminal with the run's chat template (/reset clears, /quit or Ctrl-D ends)."""
    from gemcut.generation import stream_generate
    from gemcut.serve.registry import ModelRegistry
    from gemcut.serve.settings import ServeSettings

    served = ModelRegistry(ServeSettings(trust_remote_code=trust_remote_code)).add(run)
    if not served.generates:
        raise GemcutError(f"{run}: chat needs a generative model (this is a {served.kind} model)")
    if served.template is None:
        raise GemcutError(f"{run}: chat needs a chat template, and this model's tokenizer has none; use the completions API")
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    typer.echo(f"{served.name} (context {served.context_length} tokens). /reset clears the conversation, /quit ends.")
    while True:
        try:
            text = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            typer.echo()
            return
        if text in ("/quit", "/exit"):
            return
        if text == "/reset":
            history = history[:1] if system else []
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        ids = served.template.prompt_ids(history)
        budget = min(max_tokens, served.context_length - len(ids))
        if budget < 1:
            typer.echo("(the conversation fills the context; /reset to start again)")
            history.pop()
            continue
        typer.echo("bot> ", nl=False)
        answer = []
        with served.activate():
            for delta in stream_generate(served.model, served.tokenizer, ids, max_new_tokens=budget, temperature=temperature,
                                         top_p=top_p, seed=seed, eos_ids=served.eos_ids()):
                answer.append(delta.text)
                typer.echo(delta.text, nl=False)
        typer.echo()
        history.append({"role": "assistant", "content": "".join(answer)})


@app.command("monitor")
def monitor(
    db: str = typer.Option("sqlite:///runs/serve.db", help="The server's request-log database."),
    run: Path | None = typer.Option(None, help="Run whose training prompts are the drift reference."),
    reference: Path | None = typer.Option(None, help="JSONL of training records, instead of --run."),
    since: str | None = typer.Option(None, help="Only requests newer than this: 7d, 12h, 30m or an ISO date."),
    model: str | None = typer.Option(None, help="Only this served model."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    export_data: Path | None = typer.Option(None, help="Also write feedback and logged prompts as training data into this folder."),
) -> None:
    """Latency percentiles, feedback rate and prompt drift; recommends retraining past the thresholds."""
    from gemcut.serve.db import make_engine
    from gemcut.serve.feedback import export_training_data
    from gemcut.serve.monitor import format_report, monitor_report, parse_since, read_reference, run_reference
    from gemcut.serve.store import Store

    if db.startswith("sqlite:///") and not Path(db.removeprefix("sqlite:///")).is_file():
        raise GemcutError(f"{db}: no such database; pass the --db the server was started with")
    make_engine(db).dispose()
    store = Store(db, retention_days=None)  # retention is the server's job; the monitor only reads
    ref = read_reference(reference) if reference else run_reference(run) if run else None
    since_dt = parse_since(since)
    report = monitor_report(store, ref, since=since_dt, model=model)
    typer.echo(json.dumps(report, indent=2) if as_json else format_report(report))
    if export_data is not None:
        result = export_training_data(store, export_data, since=since_dt)
        typer.echo(f"wrote {result['written']} to {export_data} (skipped: {result['skipped'] or 'none'})")
