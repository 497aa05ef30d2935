"""The FastAPI app: OpenAI-compatible inference, feedback, metrics and health, behind bearer keys.

    gemcut serve --model runs/my-run                    # the CLI builds ServeSettings and runs uvicorn
    app = create_app(ServeSettings(models=["runs/my-run"], api_keys=["k"]))   # in Python / tests

Routes: GET /health (public), GET /metrics, GET /v1/models, POST /v1/chat/completions,
POST /v1/completions, POST /v1/embeddings, POST /v1/classify, POST /v1/feedback, and the ranking page under /label when
gemcut.label is installed. Every route but /health needs `Authorization: Bearer <key>`.
Models load when the app is created (gemcut/serve/registry.py; a bad --model fails before the port opens);
the worker thread (gemcut/serve/worker.py) starts and stops with the app's lifespan. Bodies over `max_body_bytes` get 413 before they are read
(gemcut/serve/limits.py); CPU work on a request (templates, tokenisation, the request log) runs in
threads, never on the event loop, so one big prompt cannot stall other clients.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response

from gemcut.errors import GemcutError
from gemcut.netguard import install_host_check
from gemcut.serve import feedback, openai_api
from gemcut.serve.auth import require_api_key
from gemcut.serve.errors import install_error_handlers
from gemcut.serve.limits import BodyLimit
from gemcut.serve.metrics import Metrics
from gemcut.serve.registry import ModelRegistry
from gemcut.serve.settings import API_KEYS_ENV, ServeSettings
from gemcut.serve.store import Store
from gemcut.serve.worker import Worker

log = logging.getLogger("gemcut.serve")


def create_app(settings: ServeSettings, registry: ModelRegistry | None = None, background: Sequence = (),
               streamed: dict[str, tuple[int, str]] | None = None) -> FastAPI:
    """Build the app: load the models named in `settings.models` (unless a `registry` is given), open the store.
    `background`: things with start() and stop() that live as long as the server (the service's job workers);
    `streamed`: upload paths whose bodies stream through with their own size limit (gemcut/serve/limits.py)."""
    if not settings.all_api_keys():
        raise GemcutError(f"no API key configured: set ${API_KEYS_ENV}=key1,key2 or pass --api-key; every route but /health needs one")
    if registry is None:
        if not settings.models:
            raise GemcutError("nothing to serve: pass --model RUN_OR_NAME (a run folder, an exported folder or a model name)")
        registry = ModelRegistry(settings)
        for source in settings.models:
            registry.add(source)
    metrics = Metrics()
    worker = Worker(settings, metrics, registry.lock)
    store = Store(settings.db_url, settings.log_retention_days)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        for thing in background:
            thing.start()
        try:
            yield
        finally:
            for thing in reversed(background):
                thing.stop()
            worker.stop()

    # FastAPI's own /docs and /openapi.json routes would skip the app's dependencies, so they are off and
    # the schema is served by an ordinary (protected) route instead.
    app = FastAPI(title="gemcut", version="0.1.0", lifespan=lifespan, dependencies=[Depends(require_api_key)],
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings, app.state.metrics, app.state.store = settings, metrics, store
    app.state.registry, app.state.worker = registry, worker
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, on_error=metrics.record_error, streamed=streamed)
    install_error_handlers(app, on_error=metrics.record_error)  # added after it, its catch-all wraps the body limit too
    install_host_check(app, settings.host, settings.allowed_hosts)

    @app.get("/health")
    async def health() -> dict:
        # async: answered on the event loop itself, so a threadpool busy with tokenisation cannot delay it
        return {"status": "ok" if worker.running else "starting", "models": sorted(registry.models), "queue_depth": worker.depth()}

    @app.get("/metrics")
    def prometheus(request: Request) -> Response:
        metrics.queue_depth.set(worker.depth())
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/openapi.json", include_in_schema=False)
    def openapi_schema() -> dict:
        return app.openapi()

    app.include_router(openai_api.router)
    app.include_router(feedback.router)
    _mount_labeling(app, settings)
    return app


def _mount_labeling(app: FastAPI, settings: ServeSettings) -> None:
    """The ranking page of gemcut.label, when that package is present, on the same database."""
    try:
        from gemcut.label.app import install
        from gemcut.label.store import LabelStore
    except ImportError:
        return
    install(app, LabelStore(settings.db_url))
