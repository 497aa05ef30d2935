"""`/v1/fine_tuning/jobs`: create, list, retrieve, cancel, pause, resume; a job's events, checkpoints and
eval report. The API only writes rows: workers (gemcut/service/worker.py) claim queued jobs and run them.

    job = client.fine_tuning.jobs.create(model="smollm2-135m-instruct", training_file=f.id,
                                         method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}},
                                         extra_body={"gemcut": {"adapter": {"rank": 8}}})
    client.fine_tuning.jobs.list_events(job.id)      # newest first; metrics events carry step and losses

A job's `model` is a served model's name, a packaged model (`finetune_models`) or one of the caller's own
fine-tuned models; never a path. The request becomes a validated run config at once (gemcut/service/
job_spec.py), so a bad hyperparameter or override is a 400 naming it, not a failed job later.
Lifecycle: validating_files -> queued -> running -> succeeded | failed | cancelled, and paused between.
Cancel and pause of a running job are requests the worker carries out at the next step boundary.
"""

from __future__ import annotations

import secrets
import time

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse
from sqlalchemy import select, update

from gemcut.serve.auth import Principal, principal_of
from gemcut.serve.errors import APIError
from gemcut.serve.limits import lone_surrogate
from gemcut.service.db import CheckpointRow, EventRow, FileRow, JobRow, new_id, utcnow
from gemcut.service.events import add_event, event_object
from gemcut.service.job_spec import JobSpecError, job_spec
from gemcut.service.models import FT_PREFIX
from gemcut.service.objects import checkpoint_object, job_object, page
from gemcut.service.queue import queue_position
from gemcut.service.store import TERMINAL, check_limit, cursor_page, owned, scoped

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])


def _service(request: Request):
    return request.app.state.service


def _answer(service, session, row: JobRow) -> dict:
    position = queue_position(session, row) if row.status == "queued" else None
    report = (service.layout.root / row.run_dir / "report.html").is_file() if row.status == "succeeded" else False
    return job_object(row, queue_position=position, report=report)


def _ready_file(session, file_id: str | None, principal: Principal, param: str) -> FileRow:
    if not file_id or not isinstance(file_id, str):
        raise APIError(400, f"`{param}` is required: the id of a file uploaded with purpose fine-tune", param=param, code="missing_file")
    row = owned(session, FileRow, file_id, principal, param=param)
    if row.purpose != "fine-tune":
        raise APIError(400, f"{file_id} has purpose {row.purpose!r}; upload training data with purpose 'fine-tune'", param=param,
                       code="invalid_file_purpose")
    if row.status == "uploaded":
        raise APIError(400, f"{file_id} is still being checked; wait for it (client.files.wait_for_processing)", param=param,
                       code="file_not_ready")
    if row.status == "error":
        raise APIError(400, f"{file_id} ({row.filename}) did not pass the data checks: {row.status_details}", param=param,
                       code="invalid_file")
    return row


def base_source(service, name, principal: Principal) -> str:
    """Where a job's `model` loads from: a served model's source, a packaged model's name, or the caller's own
    fine-tuned model's run folder. Anything else, paths included, is refused by name."""
    if not isinstance(name, str) or not name:
        raise APIError(400, "`model` is required: a served model (GET /v1/models) or a packaged one", param="model", code="missing_model")
    if name.startswith(FT_PREFIX):
        with service.store.session() as s:
            job = s.scalars(select(JobRow).where(JobRow.fine_tuned_model == name, JobRow.status == "succeeded")).first()
        if job is not None and principal.may_see(job.owner):
            return str(service.layout.root / job.run_dir)
    served = service.registry.models.get(name)
    if served is not None and served.owner is None and served.source:
        return served.source
    if name in service.settings.finetune_models:
        return name
    choices = sorted({*(m.name for m in service.registry.models.values() if m.owner is None), *service.settings.finetune_models})
    raise APIError(400, f"model {name!r} cannot be fine-tuned here; choose one of: {', '.join(choices)} (or one of your own "
                        "fine-tuned models)", param="model", code="model_not_available")


@router.post("")
async def create_job(request: Request) -> dict:
    service, principal = _service(request), principal_of(request)
    try:
        body = await request.json()
    except ValueError:
        raise APIError(400, "the body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    found = lone_surrogate(body)
    if found is not None:
        raise APIError(400, "the request holds a lone UTF-16 surrogate, which is not valid Unicode", code="invalid_unicode")
    source = base_source(service, body.get("model"), principal)
    with service.store.session() as s:
        training = _ready_file(s, body.get("training_file"), principal, "training_file")
        validation = _ready_file(s, body["validation_file"], principal, "validation_file") if body.get("validation_file") else None
    try:
        spec = job_spec(body, base_model_source=source, training_kind=training.kind, validation=validation is not None,
                        seed_default=secrets.randbelow(2**31), training_counts=training.report,
                        validation_kind=validation.kind if validation else None,
                        validation_counts=validation.report if validation else None)
    except JobSpecError as err:
        raise APIError(400, err.message, param=err.param, code="invalid_job") from None
    job_id = new_id("ftjob")
    with service.store.session() as s, s.begin():
        row = JobRow(id=job_id, seq=time.time_ns(), owner=principal.owner, model=body["model"], training_file=training.id,
                     validation_file=validation.id if validation else None, suffix=body.get("suffix"), seed=spec.seed,
                     job_metadata=body.get("metadata"), method=spec.method, hyperparameters=spec.hyperparameters,
                     gemcut=body.get("gemcut"), config=spec.config, status="validating_files",
                     run_dir=str(service.layout.run_dir(job_id).relative_to(service.layout.root)), result_files=[])
        s.add(row)
        s.flush()
        add_event(s, job_id, f"Validating training file: {training.id}" + (f" and validation file: {validation.id}" if validation else ""))
        # The files were checked on upload; what is left is that their kind fits the method, which job_spec did.
        row.status = "queued"
        add_event(s, job_id, "Files validated, moving job to queued state")
    with service.store.session() as s:
        return _answer(service, s, s.get(JobRow, job_id))


@router.get("")
def list_jobs(request: Request, after: str | None = None, limit: int = Query(20)) -> dict:
    """Newest first; `metadata[key]=value` query parameters keep the jobs whose metadata has them all."""
    service, principal = _service(request), principal_of(request)
    check_limit(limit)
    wanted = {k[len("metadata["):-1]: v for k, v in request.query_params.items() if k.startswith("metadata[") and k.endswith("]")}
    with service.store.session() as s:
        query = scoped(select(JobRow), JobRow, principal)
        cursor = owned(s, JobRow, after, principal, param="after").seq if after else None
        if not wanted:
            rows, more = cursor_page(s, query, JobRow.seq, after_value=cursor, limit=limit)
        else:  # JSON columns filter differently in SQLite and PostgreSQL: the owner's jobs are filtered here
            candidates, _ = cursor_page(s, query, JobRow.seq, after_value=cursor, limit=100_000)
            matching = [r for r in candidates if all((r.job_metadata or {}).get(k) == v for k, v in wanted.items())]
            rows, more = matching[:limit], len(matching) > limit
        return page([_answer(service, s, r) for r in rows], more)


@router.get("/{job_id}")
def retrieve_job(job_id: str, request: Request) -> dict:
    service = _service(request)
    with service.store.session() as s:
        return _answer(service, s, owned(s, JobRow, job_id, principal_of(request)))


def _transition(request: Request, job_id: str, action: str) -> dict:
    """cancel | pause | resume: what can happen at once happens here; a running job's is left to its worker.
    The change is conditional on the status it was decided from, so a worker claiming or finishing the job at
    the same moment is never overwritten (the decision is then made again on the new status)."""
    service = _service(request)
    for _ in range(5):
        with service.store.session() as s, s.begin():
            row = owned(s, JobRow, job_id, principal_of(request))
            status = row.status
            values, message = _decide(job_id, status, action)
            changed = s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.status == status).values(**values)).rowcount
            if changed:
                add_event(s, job_id, message)
                break
    return retrieve_job(job_id, request)


def _decide(job_id: str, status: str, action: str) -> tuple[dict, str]:
    """(the columns to set, the event to write) for `action` on a job in `status`; a 400 when it cannot be done."""
    if action == "resume":
        if status != "paused":
            raise APIError(400, f"only a paused job can be resumed; {job_id} is {status}", param="fine_tuning_job_id", code="invalid_state")
        return {"status": "queued", "requested": None}, "Job resumed; queued to continue from its last checkpoint"
    if status in TERMINAL:
        raise APIError(400, f"{job_id} has already {status}; nothing to {action}", param="fine_tuning_job_id", code="invalid_state")
    if status == "running":
        return {"requested": action}, f"{action.capitalize()} requested; the job stops after its current step and keeps its last checkpoint"
    if action == "cancel":
        return {"status": "cancelled", "finished_at": utcnow(), "requested": None}, "Job cancelled"
    if status == "paused":
        raise APIError(400, f"{job_id} is already paused", param="fine_tuning_job_id", code="invalid_state")
    return {"status": "paused"}, "Job paused before it started; resume queues it again"


@router.post("/{job_id}/cancel")
def cancel_job(job_id: str, request: Request) -> dict:
    return _transition(request, job_id, "cancel")


@router.post("/{job_id}/pause")
def pause_job(job_id: str, request: Request) -> dict:
    return _transition(request, job_id, "pause")


@router.post("/{job_id}/resume")
def resume_job(job_id: str, request: Request) -> dict:
    return _transition(request, job_id, "resume")


@router.get("/{job_id}/events")
def list_events(job_id: str, request: Request, after: str | None = None, limit: int = Query(20)) -> dict:
    service, principal = _service(request), principal_of(request)
    check_limit(limit, 1000)
    with service.store.session() as s:
        owned(s, JobRow, job_id, principal)
        cursor = None
        if after:
            cursor = s.scalar(select(EventRow.seq).where(EventRow.id == after, EventRow.job_id == job_id))
            if cursor is None:
                raise APIError(404, f"No such event object: {after}", param="after", code="not_found")
        rows, more = cursor_page(s, select(EventRow).where(EventRow.job_id == job_id), EventRow.seq, after_value=cursor, limit=limit)
        return page([event_object(r) for r in rows], more)


@router.get("/{job_id}/checkpoints")
def list_checkpoints(job_id: str, request: Request, after: str | None = None, limit: int = Query(10)) -> dict:
    service, principal = _service(request), principal_of(request)
    check_limit(limit)
    with service.store.session() as s:
        job = owned(s, JobRow, job_id, principal)
        run = service.layout.root / job.run_dir / "checkpoints"
        # Checkpoints the run has since rotated away (train.keep_checkpoints) can no longer be served: not listed.
        rows = [r for r in s.scalars(select(CheckpointRow).where(CheckpointRow.job_id == job_id).order_by(CheckpointRow.step.desc()))
                if (run / r.folder).is_dir()]
        if after:
            ids = [r.id for r in rows]
            if after not in ids:
                raise APIError(404, f"No such checkpoint object: {after}", param="after", code="not_found")
            rows = rows[ids.index(after) + 1:]
        return page([checkpoint_object(r) for r in rows[:limit]], len(rows) > limit)


@router.get("/{job_id}/report", response_class=HTMLResponse)
def eval_report(job_id: str, request: Request) -> HTMLResponse:
    """gemcut's own: the base-vs-tuned report that `gemcut eval` wrote for a finished job (self-contained HTML)."""
    service = _service(request)
    with service.store.session() as s:
        job = owned(s, JobRow, job_id, principal_of(request))
    report = service.layout.root / job.run_dir / "report.html"
    if not report.is_file():
        raise APIError(404, f"{job_id} has no evaluation report yet (status {job.status})", code="not_found")
    # The report is data to look at: no scripts run in it, whatever a model wrote into its samples.
    return HTMLResponse(report.read_text(encoding="utf-8"), headers={"Content-Security-Policy": "sandbox; default-src 'none'; "
                                                                      "img-src data:; style-src 'unsafe-inline'"})

