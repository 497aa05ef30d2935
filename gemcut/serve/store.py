"""Reading and writing the request log and feedback; retention. The only module that runs queries.

    store = Store("sqlite:///runs/serve.db", retention_days=30)
    store.log_request(response_id="chatcmpl-1", endpoint="chat", model="my-run", prompt_tokens=12, ...)
    store.add_feedback("chatcmpl-1", rating=1, comment="good")
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from gemcut.serve.db import Feedback, RequestLog, make_engine, utcnow

PURGE_EVERY_S = 3600.0


@dataclass
class FeedbackStats:
    responses: int
    with_feedback: int
    up: int
    down: int

    @property
    def rate(self) -> float:
        return self.with_feedback / self.responses if self.responses else 0.0


class Store:
    """Thread-safe access to the tables; old request rows are purged at start and then hourly."""

    def __init__(self, url: str, retention_days: float | None = 30.0):
        """`retention_days=None` keeps everything (readers such as `gemcut monitor` leave purging to the server)."""
        self.url = url
        self.engine = make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.retention = timedelta(days=retention_days) if retention_days is not None else None
        self._purge_lock = threading.Lock()
        self._last_purge = 0.0
        self.purge()

    def session(self) -> Session:
        return self.sessions()

    # ------------------------------------------------------------------ writes

    def log_request(self, **fields) -> None:
        """Insert one request row (fields are RequestLog columns); purges old rows once an hour."""
        with self.session() as s, s.begin():
            s.add(RequestLog(**fields))
        if self.retention is not None and time.monotonic() - self._last_purge > PURGE_EVERY_S:
            self.purge()

    def add_feedback(self, response_id: str, rating: int, comment: str | None = None, choice_index: int = 0) -> int | None:
        """Store feedback for a logged response; returns its id, or None when the response id is unknown."""
        with self.session() as s, s.begin():
            if s.scalar(select(RequestLog.id).where(RequestLog.response_id == response_id)) is None:
                return None
            fb = Feedback(response_id=response_id, rating=rating, comment=comment, choice_index=choice_index)
            s.add(fb)
            s.flush()
            return fb.id

    def purge(self, now: datetime | None = None) -> int:
        """Delete request rows (and their feedback) older than the retention; returns rows deleted."""
        if self.retention is None:
            return 0
        with self._purge_lock:
            cutoff = (now or utcnow()) - self.retention
            with self.session() as s, s.begin():
                old = select(RequestLog.response_id).where(RequestLog.created_at < cutoff)
                s.execute(delete(Feedback).where(Feedback.response_id.in_(old)))
                deleted = s.execute(delete(RequestLog).where(RequestLog.created_at < cutoff)).rowcount or 0
            self._last_purge = time.monotonic()
            return deleted

    # ------------------------------------------------------------------ reads

    def get_request(self, response_id: str) -> RequestLog | None:
        with self.session() as s:
            return s.scalar(select(RequestLog).where(RequestLog.response_id == response_id))

    def requests(self, since: datetime | None = None, model: str | None = None, ok_only: bool = False) -> list[RequestLog]:
        with self.session() as s:
            q = select(RequestLog).order_by(RequestLog.created_at)
            if since is not None:
                q = q.where(RequestLog.created_at >= since)
            if model is not None:
                q = q.where(RequestLog.model == model)
            if ok_only:
                q = q.where(RequestLog.status == 200)
            return list(s.scalars(q))

    def feedback_with_requests(self, since: datetime | None = None) -> Iterator[tuple[Feedback, RequestLog]]:
        with self.session() as s:
            q = select(Feedback, RequestLog).join(RequestLog, RequestLog.response_id == Feedback.response_id).order_by(Feedback.created_at)
            if since is not None:
                q = q.where(RequestLog.created_at >= since)
            yield from s.execute(q).all()

    def feedback_stats(self, since: datetime | None = None, model: str | None = None) -> FeedbackStats:
        with self.session() as s:
            rq = select(func.count(RequestLog.id)).where(RequestLog.status == 200, RequestLog.endpoint != "classify")
            fq = select(Feedback.rating, func.count(func.distinct(Feedback.response_id))).join(
                RequestLog, RequestLog.response_id == Feedback.response_id).group_by(Feedback.rating)
            anyq = select(func.count(func.distinct(Feedback.response_id))).join(RequestLog, RequestLog.response_id == Feedback.response_id)
            for cond in ([RequestLog.created_at >= since] if since else []) + ([RequestLog.model == model] if model else []):
                rq, fq, anyq = rq.where(cond), fq.where(cond), anyq.where(cond)
            by_rating = {rating: count for rating, count in s.execute(fq).all()}
            return FeedbackStats(responses=s.scalar(rq) or 0, with_feedback=s.scalar(anyq) or 0,
                                 up=by_rating.get(1, 0), down=by_rating.get(-1, 0))
