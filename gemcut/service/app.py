"""The server that is both the inference API and the fine-tuning service.

    gemcut serve --model smollm2-135m-instruct                 # the CLI builds ServiceSettings and runs this
    app = create_service_app(ServiceSettings(models=[str(tiny)], api_keys=["admin-key"], service_root=str(tmp),
                                             workers=1, job_lease_s=5))    # in Python / tests
    key = app.state.service.keys.create("alice")               # an owner's key (gemcut keys create alice)

On top of gemcut/serve/app.py's routes: `/v1/files`, `/v1/fine_tuning/jobs` (and events, checkpoints, the
eval report), fine-tuned models served by name on first call, owners' keys from the job store, the
dashboard at /dashboard, and `workers` job workers inside the process (0: jobs wait for `gemcut worker`).
The job store is `jobs_db_url` (SQLite in the service folder by default; PostgreSQL for several workers).
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import FastAPI

from gemcut.serve.app import create_app
from gemcut.serve.registry import ModelRegistry
from gemcut.service import dashboard, files_api, jobs_api
from gemcut.service.files_api import FileChecker
from gemcut.service.keys import KeyRing
from gemcut.service.layout import ServiceLayout
from gemcut.service.models import FineTunedModels
from gemcut.service.settings import ServiceSettings
from gemcut.service.store import ServiceStore
from gemcut.service.worker import JobWorker


@dataclass
class Service:
    """What the service's routes share, on `app.state.service`."""

    settings: ServiceSettings
    layout: ServiceLayout
    store: ServiceStore
    keys: KeyRing
    registry: ModelRegistry
    checker: FileChecker
    workers: list[JobWorker]


def create_service_app(settings: ServiceSettings, registry: ModelRegistry | None = None) -> FastAPI:
    """The inference app with the fine-tuning service on it; models in `settings.models` load now."""
    layout = settings.layout().ensure()
    store = ServiceStore(settings.jobs_db())
    if registry is None:
        registry = ModelRegistry(settings)
        for source in settings.models:
            registry.add(source)
    finetuned = FineTunedModels(store, layout)
    registry.resolver = finetuned.resolve
    checker = FileChecker(store, layout)
    workers = [JobWorker(store.sessions, layout, max_jobs=settings.max_concurrent_jobs, lease_s=settings.job_lease_s,
                         threads=settings.num_threads) for _ in range(settings.workers)]
    keys = KeyRing(store.sessions)
    app = create_app(settings, registry, background=[checker, *workers],
                     streamed={"/v1/files": (settings.max_upload_bytes, "--max-upload-bytes (max_upload_bytes in a settings file)")})
    app.state.service = Service(settings, layout, store, keys, registry, checker, workers)
    app.state.key_lookup = keys.lookup
    app.state.model_lister = finetuned.listing
    app.include_router(files_api.router)
    app.include_router(jobs_api.router)
    dashboard.install(app)
    return app
