"""The job store's connection and the queries the API shares: rows scoped to their owner, cursor pages.

    store = ServiceStore("sqlite:///srv/gemcut/service.db")       # or postgresql+psycopg://...
    with store.session() as s:
        job = owned(s, JobRow, "ftjob-…", principal)             # 404 in OpenAI's words when it is not theirs

Another owner's row answers exactly as a missing one (404), so ids cannot be probed across owners.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select
from sqlalchemy.orm import Session, sessionmaker

from gemcut.serve.auth import Principal
from gemcut.serve.errors import APIError
from gemcut.service.db import make_engine

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
OBJECT_NAMES = {"FileRow": "File", "JobRow": "fine-tuning job", "CheckpointRow": "checkpoint"}


class ServiceStore:
    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    def session(self) -> Session:
        return self.sessions()


def owned(session: Session, table: type, row_id: str, principal: Principal, *, param: str | None = None) -> Any:
    """The row `row_id` of `table` when `principal` may see it; a 404 otherwise (missing and foreign alike)."""
    row = session.get(table, row_id)
    if row is None or not principal.may_see(row.owner) or getattr(row, "deleted", False):
        raise APIError(404, f"No such {OBJECT_NAMES[table.__name__]} object: {row_id}", param=param, code="not_found")
    return row


def scoped(query: Select, table: type, principal: Principal) -> Select:
    """`query` limited to what `principal` may see."""
    return query if principal.admin else query.where(table.owner == principal.owner)


def cursor_page(session: Session, query: Select, order_column, *, after_value: Any | None, limit: int,
                descending: bool = True) -> tuple[list, bool]:
    """Rows of `query` after the cursor (newest first when `descending`), at most `limit`, and whether more follow."""
    if after_value is not None:
        query = query.where(order_column < after_value if descending else order_column > after_value)
    query = query.order_by(order_column.desc() if descending else order_column.asc()).limit(limit + 1)
    rows = list(session.scalars(query))
    return rows[:limit], len(rows) > limit


def check_limit(limit: int, most: int = 100) -> int:
    if not 1 <= limit <= most:
        raise APIError(400, f"limit must be between 1 and {most}, got {limit}", param="limit", code="invalid_limit")
    return limit

