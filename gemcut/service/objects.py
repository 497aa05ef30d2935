"""The service's rows as OpenAI answers them: `file`, `fine_tuning.job`, `fine_tuning.job.checkpoint`, lists.

Shapes follow the official openai-python client's types (types/file_object.py, types/fine_tuning/*.py), so
its `client.files.*` and `client.fine_tuning.jobs.*` parse every answer. gemcut's own additions to a job
ride under a `gemcut` key, which the client keeps as an extra field.
"""

from __future__ import annotations

from gemcut.service.db import CheckpointRow, FileRow, JobRow, unix


def file_object(row: FileRow) -> dict:
    return {"object": "file", "id": row.id, "bytes": row.bytes, "created_at": unix(row.created_at), "filename": row.filename,
            "purpose": row.purpose, "status": row.status, "status_details": row.status_details, "expires_at": None}


def job_object(row: JobRow, *, queue_position: int | None = None, report: bool = False) -> dict:
    return {
        "object": "fine_tuning.job", "id": row.id, "created_at": unix(row.created_at), "error": row.error,
        "fine_tuned_model": row.fine_tuned_model, "finished_at": unix(row.finished_at), "hyperparameters": row.hyperparameters,
        "model": row.model, "organization_id": row.owner, "result_files": list(row.result_files or []), "seed": row.seed,
        "status": row.status, "trained_tokens": row.trained_tokens, "training_file": row.training_file,
        "validation_file": row.validation_file, "estimated_finish": unix(row.estimated_finish), "integrations": [],
        "metadata": row.job_metadata, "method": row.method, "user_provided_suffix": row.suffix,
        "gemcut": {"progress": row.progress, "queue_position": queue_position, "headline": row.headline, "report": report,
                   "attempts": row.attempts, "run": row.run_dir},
    }


def checkpoint_object(row: CheckpointRow) -> dict:
    metrics = {"step": float(row.step), **{k: v for k, v in (row.metrics or {}).items() if v is not None}}
    return {"object": "fine_tuning.job.checkpoint", "id": row.id, "created_at": unix(row.created_at),
            "fine_tuned_model_checkpoint": row.name, "fine_tuning_job_id": row.job_id, "metrics": metrics,
            "step_number": row.step}


def page(data: list[dict], has_more: bool) -> dict:
    """A cursor page: the client asks for the next one with `after` = the last id."""
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}
