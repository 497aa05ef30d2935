"""The service's tables (SQLAlchemy 2): API keys and their owners, files, fine-tuning jobs, their events and
checkpoints. One schema for SQLite (the default, one file under the service folder) and PostgreSQL (teams:
`postgresql+psycopg://user@host/db`, shared by every worker).

Ids are OpenAI's shapes (`file-…`, `ftjob-…`, `ftevent-…`, `ftckpt-…`); times are stored naive in UTC and
answered as Unix seconds. JSON columns hold what the API answers verbatim (a job's method, metadata, error).
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, ForeignKey, Index, Integer, String, Text, create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from gemcut.dbfiles import make_private
from gemcut.errors import GemcutError


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)  # naive UTC: SQLite has no time zones


def unix(when: datetime | None) -> int | None:
    return None if when is None else int(when.replace(tzinfo=UTC).timestamp())


def new_id(prefix: str) -> str:
    """`file-3Zq…`: a prefix and 24 url-safe random characters (ids are never guessable, never sequential)."""
    return f"{prefix}-{secrets.token_urlsafe(18)}"


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    """One bearer key of one owner. Only the key's SHA-256 is stored; `prefix` (its first characters) names it."""

    __tablename__ = "service_api_key"

    key_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    prefix: Mapped[str] = mapped_column(String(16))
    owner: Mapped[str] = mapped_column(String(64), index=True)
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class FileRow(Base):
    """An uploaded file. `storage` is the server's own name for its bytes (never a client's path)."""

    __tablename__ = "service_file"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    filename: Mapped[str] = mapped_column(String(255))  # as uploaded, for display only
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    status: Mapped[str] = mapped_column(String(16), default="uploaded")  # uploaded | processed | error
    status_details: Mapped[str | None] = mapped_column(Text, nullable=True)
    kind: Mapped[str | None] = mapped_column(String(32), nullable=True)  # the record kind the pipeline found
    report: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # counts: records, skipped by reason, ...
    storage: Mapped[str] = mapped_column(String(255))
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)


class JobRow(Base):
    """A fine-tuning job and its place in the queue. `config` is the resolved gemcut run config it trains with."""

    __tablename__ = "service_job"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, index=True)  # creation order: queue position and list order
    owner: Mapped[str] = mapped_column(String(64), index=True)
    model: Mapped[str] = mapped_column(String(255))
    training_file: Mapped[str] = mapped_column(String(40))
    validation_file: Mapped[str | None] = mapped_column(String(40), nullable=True)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    seed: Mapped[int] = mapped_column(BigInteger)
    job_metadata: Mapped[dict | None] = mapped_column("metadata", JSON, nullable=True)
    method: Mapped[dict] = mapped_column(JSON)  # {type, supervised|dpo|reinforcement: {hyperparameters, ...}}
    hyperparameters: Mapped[dict] = mapped_column(JSON)  # resolved numbers, answered as the job's hyperparameters
    gemcut: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # the caller's extra_body.gemcut overrides
    config: Mapped[dict] = mapped_column(JSON)  # the RunConfig as a dict, validated when the job was created
    status: Mapped[str] = mapped_column(String(24), index=True)
    error: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # {code, message, param}
    requested: Mapped[str | None] = mapped_column(String(16), nullable=True)  # cancel | pause, for the worker
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    estimated_finish: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(255), nullable=True, unique=True)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    result_files: Mapped[list] = mapped_column(JSON, default=list)
    run_dir: Mapped[str] = mapped_column(String(512))  # relative to the service folder
    progress: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # {step, total_steps}
    headline: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # gemcut eval's base-vs-tuned headline
    # The lease: the worker holding the job renews lease_until by heartbeat; past it, another may take it.
    worker: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)


class EventRow(Base):
    """One line of a job's history: a message, or a metrics event whose `data` has step and losses."""

    __tablename__ = "service_event"

    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("service_job.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    level: Mapped[str] = mapped_column(String(8), default="info")  # info | warn | error
    type: Mapped[str] = mapped_column(String(8), default="message")  # message | metrics
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict | None] = mapped_column(JSON, nullable=True)


class CheckpointRow(Base):
    """A kept checkpoint of a job, servable as `fine_tuned_model_checkpoint`."""

    __tablename__ = "service_checkpoint"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("service_job.id", ondelete="CASCADE"), index=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    step: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(255), unique=True)  # ft:...:ckpt-step-N
    folder: Mapped[str] = mapped_column(String(255))  # the checkpoint's folder name in the run, e.g. step-40
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


Index("ix_service_job_queue", JobRow.status, JobRow.seq)
Index("ix_service_event_job_seq", EventRow.job_id, EventRow.seq)


def make_engine(url: str) -> Engine:
    """An engine for `url` with the tables created. SQLite: an owner-only file in WAL mode, with a busy timeout
    so that several workers on one file wait for each other's writes instead of failing."""
    make_private(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.close()
    else:
        try:
            engine = create_engine(url, pool_pre_ping=True)
        except ModuleNotFoundError as missing:  # the database's driver, e.g. psycopg for postgresql+psycopg://
            raise GemcutError(f"the job store {url.split('://', 1)[0]}:// needs the Python package {missing.name!r}: "
                              "pip install 'gemcut[postgres]' (psycopg) for PostgreSQL") from None
    Base.metadata.create_all(engine)
    return engine
