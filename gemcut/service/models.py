"""Fine-tuned models and checkpoints by name: served by the same server from the job's run folder, on first call.

    ft:smollm2-135m-instruct:alice:support:3Zq…              a succeeded job's fine_tuned_model (its final/)
    ft:smollm2-135m-instruct:alice:support:3Zq…:ckpt-step-40 one of its checkpoints

The server's model registry asks `resolve(name)` for a name it has not loaded (gemcut/serve/registry.py), so
a job finished by a worker on another machine is callable at once, and LoRA runs share their loaded base.
The owner comes along: another owner's key gets the same 404 as for a name that does not exist.
"""

from __future__ import annotations

from sqlalchemy import select

from gemcut.serve.auth import Principal
from gemcut.serve.registry import Resolved
from gemcut.service.db import CheckpointRow, JobRow, unix
from gemcut.service.layout import ServiceLayout
from gemcut.service.store import ServiceStore, scoped

FT_PREFIX = "ft:"


class FineTunedModels:
    def __init__(self, store: ServiceStore, layout: ServiceLayout):
        self.store, self.layout = store, layout

    def resolve(self, name: str) -> Resolved | None:
        if not name.startswith(FT_PREFIX):
            return None
        with self.store.session() as s:
            job = s.scalars(select(JobRow).where(JobRow.fine_tuned_model == name, JobRow.status == "succeeded")).first()
            if job is not None:
                return Resolved(str(self.layout.root / job.run_dir), owner=job.owner)
            checkpoint = s.scalars(select(CheckpointRow).where(CheckpointRow.name == name)).first()
            if checkpoint is None:
                return None
            job = s.get(JobRow, checkpoint.job_id)
            folder = self.layout.root / job.run_dir
            if not (folder / "checkpoints" / checkpoint.folder).is_dir():
                return None  # rotated away since (train.keep_checkpoints)
            return Resolved(str(folder), owner=checkpoint.owner, checkpoint=checkpoint.folder)

    def listing(self, principal: Principal) -> list[dict]:
        """GET /v1/models entries for the succeeded jobs `principal` may call, loaded or not."""
        with self.store.session() as s:
            jobs = s.scalars(scoped(select(JobRow).where(JobRow.status == "succeeded"), JobRow, principal).order_by(JobRow.seq)).all()
            return [{"id": j.fine_tuned_model, "object": "model", "created": unix(j.finished_at), "owned_by": j.owner,
                     "parent": j.model} for j in jobs if j.fine_tuned_model]
