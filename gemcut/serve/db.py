"""The server's tables (SQLAlchemy 2): one row per answered request, one per piece of feedback.

SQLite by default (`sqlite:///runs/serve.db`); any SQLAlchemy URL works. Prompt and response text are
only filled when the server runs with `log_prompts` on; lengths, tokens and latency always are.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import DateTime, Float, ForeignKey, Index, Integer, String, Text, create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from gemcut.dbfiles import make_private


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)  # stored naive in UTC: SQLite has no time zones


class Base(DeclarativeBase):
    pass


class RequestLog(Base):
    __tablename__ = "request_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    response_id: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    endpoint: Mapped[str] = mapped_column(String(32))  # chat, completions, classify
    model: Mapped[str] = mapped_column(String(200), index=True)
    status: Mapped[int] = mapped_column(Integer, default=200)
    error_type: Mapped[str | None] = mapped_column(String(64), nullable=True)
    prompt_chars: Mapped[int] = mapped_column(Integer, default=0)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    n: Mapped[int] = mapped_column(Integer, default=1)
    latency_ms: Mapped[float] = mapped_column(Float, default=0.0)
    queue_ms: Mapped[float] = mapped_column(Float, default=0.0)
    stream: Mapped[int] = mapped_column(Integer, default=0)
    # Only with log_prompts: the prompt as JSON (messages list or string) and the first choice's text.
    prompt_text: Mapped[str | None] = mapped_column(Text, nullable=True)
    response_text: Mapped[str | None] = mapped_column(Text, nullable=True)


class Feedback(Base):
    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    response_id: Mapped[str] = mapped_column(String(64), ForeignKey("request_log.response_id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    rating: Mapped[int] = mapped_column(Integer)  # +1 thumbs up, -1 thumbs down
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    choice_index: Mapped[int] = mapped_column(Integer, default=0)


Index("ix_request_log_model_created", RequestLog.model, RequestLog.created_at)


def make_engine(url: str) -> Engine:
    """An engine for `url`, creating the SQLite file (owner-only: it holds prompts) and the tables if needed."""
    make_private(url)
    kwargs = {"connect_args": {"check_same_thread": False}} if url.startswith("sqlite") else {}
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):
        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")  # so retention deletes feedback with its request
            cur.execute("PRAGMA journal_mode=WAL")  # readers (gemcut monitor) do not block the server
            cur.close()
    Base.metadata.create_all(engine)
    return engine
