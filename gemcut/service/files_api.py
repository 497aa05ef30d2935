"""`/v1/files`: upload, list, retrieve, download and delete fine-tuning files, each owned by its uploader.

    client.files.create(file=open("train.jsonl", "rb"), purpose="fine-tune")
    client.files.wait_for_processing(file.id)      # status "processed", or "error" naming the bad lines

An upload streams to `<service>/files/<file-id>` (the server's name, never the client's), up to
`max_upload_bytes`; then the data pipeline checks it in the background (gemcut/service/uploads.py) and the
file's status becomes `processed` or `error` with `status_details` naming the first bad lines. Nothing in a
file is executed or unpickled. Only purpose `fine-tune` is uploadable; `fine-tune-results` files are the
workers' per-step metrics of finished jobs.
"""

from __future__ import annotations

import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from sqlalchemy import select

from gemcut.serve.auth import principal_of
from gemcut.serve.errors import APIError
from gemcut.service.db import FileRow, JobRow, new_id
from gemcut.service.layout import ServiceLayout
from gemcut.service.objects import file_object, page
from gemcut.service.store import TERMINAL, ServiceStore, check_limit, cursor_page, owned, scoped
from gemcut.service.uploads import validate_upload

log = logging.getLogger("gemcut.service")
router = APIRouter(prefix="/v1/files", tags=["files"])
UPLOADABLE = ("fine-tune",)
PURPOSES = ("fine-tune", "fine-tune-results")


class FileChecker:
    """Checks uploaded files with the data pipeline, one at a time, off the request; at start it picks up
    files a stopped server left unchecked."""

    def __init__(self, store: ServiceStore, layout: ServiceLayout):
        self.store, self.layout = store, layout
        self.pool: ThreadPoolExecutor | None = None

    def start(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gemcut-file-check")
        with self.store.session() as s:
            for file_id in s.scalars(select(FileRow.id).where(FileRow.status == "uploaded", FileRow.deleted.is_(False))):
                self.submit(file_id)

    def stop(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, file_id: str) -> None:
        if self.pool is None:  # not started (an app used without its lifespan): check now
            self.check(file_id)
        else:
            self.pool.submit(self.check, file_id)

    def check(self, file_id: str) -> None:
        with self.store.session() as s:
            row = s.get(FileRow, file_id)
            filename, purpose = row.filename, row.purpose
        try:
            result = validate_upload(self.layout.file_path(file_id), filename, purpose=purpose)
            fields = {"status": result.status, "status_details": result.status_details, "kind": result.kind,
                      "report": result.counts}
        except Exception:  # a fault of ours, not the file's: say so rather than leave the file "uploaded" forever
            log.exception("checking %s failed", file_id)
            fields = {"status": "error", "status_details": "the server failed while checking this file; its log has the "
                                                           "details (please report it)"}
        with self.store.session() as s, s.begin():
            row = s.get(FileRow, file_id)
            for key, value in fields.items():
                setattr(row, key, value)


def _service(request: Request):
    return request.app.state.service


def _save(source, dest: Path) -> int:
    fd = os.open(dest, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "wb") as out:
        shutil.copyfileobj(source, out, 1 << 20)
        return out.tell()


@router.post("")
async def create_file(request: Request) -> dict:
    service, principal = _service(request), principal_of(request)
    form = await request.form(max_files=1, max_fields=4)
    upload, purpose = form.get("file"), form.get("purpose")
    if purpose not in UPLOADABLE:
        raise APIError(400, f"purpose must be one of {', '.join(UPLOADABLE)} (this server takes fine-tuning files only), "
                            f"got {purpose!r}", param="purpose", code="invalid_purpose")
    if upload is None or isinstance(upload, str):
        raise APIError(400, "send the file as the multipart field `file`", param="file", code="missing_file")
    filename = Path(upload.filename or "upload.jsonl").name[:255]  # a display name: never used as a path
    file_id = new_id("file")
    size = await run_in_threadpool(_save, upload.file, service.layout.file_path(file_id))
    with service.store.session() as s, s.begin():
        row = FileRow(id=file_id, owner=principal.owner, filename=filename, purpose=purpose, bytes=size, status="uploaded",
                      storage=file_id)
        s.add(row)
    service.checker.submit(file_id)
    return file_object(row)


@router.get("")
def list_files(request: Request, after: str | None = None, limit: int = Query(10000), order: Literal["asc", "desc"] = "desc",
               purpose: str | None = None) -> dict:
    service, principal = _service(request), principal_of(request)
    check_limit(limit, 10000)
    with service.store.session() as s:
        query = scoped(select(FileRow).where(FileRow.deleted.is_(False)), FileRow, principal)
        if purpose:
            query = query.where(FileRow.purpose == purpose)
        cursor = owned(s, FileRow, after, principal, param="after").created_at if after else None
        rows, more = cursor_page(s, query, FileRow.created_at, after_value=cursor, limit=limit, descending=order == "desc")
        return page([file_object(r) for r in rows], more)


@router.get("/{file_id}")
def retrieve_file(file_id: str, request: Request) -> dict:
    with _service(request).store.session() as s:
        return file_object(owned(s, FileRow, file_id, principal_of(request)))


@router.get("/{file_id}/content")
def file_content(file_id: str, request: Request) -> FileResponse:
    service = _service(request)
    with service.store.session() as s:
        row = owned(s, FileRow, file_id, principal_of(request))
    return FileResponse(service.layout.file_path(row.id), media_type="application/octet-stream", filename=row.filename)


@router.delete("/{file_id}")
def delete_file(file_id: str, request: Request) -> dict:
    service = _service(request)
    with service.store.session() as s, s.begin():
        row = owned(s, FileRow, file_id, principal_of(request))
        users = s.scalars(select(JobRow.id).where((JobRow.training_file == file_id) | (JobRow.validation_file == file_id),
                                                  JobRow.status.not_in(TERMINAL))).all()
        if users:
            raise APIError(400, f"{file_id} is used by unfinished job(s) {', '.join(users)}; cancel them first or wait",
                           param="file_id", code="file_in_use")
        row.deleted = True
    service.layout.file_path(file_id).unlink(missing_ok=True)
    return {"object": "file", "id": file_id, "deleted": True}
