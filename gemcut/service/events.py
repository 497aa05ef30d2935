"""A job's history: message and metrics events, written by the API and the workers, read by both.

    with store.session() as s, s.begin():
        add_event(s, job.id, "Fine-tuning job started")
        add_event(s, job.id, "Step 10/40: training loss=2.31", type="metrics", data={"step": 10, "train_loss": 2.31})

Events are answered newest first (OpenAI's order); `seq` orders them, since several can share a second.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from gemcut.service.db import EventRow, new_id, unix


def add_event(session: Session, job_id: str, message: str, *, level: str = "info", type: str = "message",
              data: dict | None = None) -> EventRow:
    row = EventRow(id=new_id("ftevent"), job_id=job_id, level=level, type=type, message=message, data=data)
    session.add(row)
    return row


def event_object(row: EventRow) -> dict:
    """The event as OpenAI answers it (`fine_tuning.job.event`)."""
    return {"object": "fine_tuning.job.event", "id": row.id, "created_at": unix(row.created_at), "level": row.level,
            "message": row.message, "type": row.type, "data": row.data or {}}
