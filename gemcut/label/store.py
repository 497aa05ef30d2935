"""The labeling queue: prompts, their sampled completions, leases, rankings, skips and flags.

    gemcut generate RUN_OR_MODEL prompts.jsonl --n 4     # fills it
    gemcut label                                          # serves the ranking page over it
    gemcut label export --out prefs.jsonl                 # reads the rankings back out

One SQLAlchemy 2 database (a SQLite file, `gemcut_home()/gemcut.db`, unless `--db URL` says otherwise).
A prompt is handed to one labeler at a time: handing it out inserts an `open` row in `assignments`, and a
partial unique index on (prompt_id) WHERE state = 'open' makes a second open lease impossible, also
between processes. A lease that runs past `expires_at` is closed as `expired` and the prompt goes back
into the queue. A prompt leaves the queue once it has `rankings_per_prompt` rankings, or when it is
flagged; a skip only removes it from the queue of the labeler who skipped it.

A prompt keeps its `messages` (the chat `gemcut generate` sampled from, as a JSON column) beside the text
shown for it; a database made before that column gets it added on open, and its prompts keep their text
(messages NULL).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from sqlalchemy import JSON, DateTime, ForeignKey, Index, Integer, String, Text, create_engine, event, func, inspect, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

from gemcut.dbfiles import make_private
from gemcut.errors import GemcutError

DEFAULT_LEASE_SECONDS = 15 * 60


class LabelError(GemcutError):
    """A labeling request that cannot be honoured (unknown prompt, bad ranking, lease held by someone else)."""


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def default_db_url() -> str:
    """`sqlite:///<gemcut home>/gemcut.db` (the home is $GEMCUT_HOME, default ~/.cache/gemcut)."""
    from gemcut.models.resolve import gemcut_home

    home = gemcut_home()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'gemcut.db'}"


class Base(DeclarativeBase):
    pass


class Prompt(Base):
    __tablename__ = "label_prompts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    text: Mapped[str] = mapped_column(Text)
    messages: Mapped[list | None] = mapped_column(JSON, default=None)  # the chat sampled from; None: `text` as it is
    source: Mapped[str | None] = mapped_column(String(512), default=None)  # "prompts.jsonl:12"
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_utcnow)
    completions: Mapped[list[Completion]] = relationship(back_populates="prompt", order_by="Completion.position")


class Completion(Base):
    __tablename__ = "label_completions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("label_prompts.id"), index=True)
    position: Mapped[int] = mapped_column(Integer)  # order in which they were sampled (shown shuffled)
    text: Mapped[str] = mapped_column(Text)
    model: Mapped[str | None] = mapped_column(String(512), default=None)
    params: Mapped[dict | None] = mapped_column(JSON, default=None)  # temperature, top_p, seed
    prompt: Mapped[Prompt] = relationship(back_populates="completions")


class Assignment(Base):
    """One hand-out of a prompt to a labeler; at most one `open` row per prompt."""

    __tablename__ = "label_assignments"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("label_prompts.id"))
    labeler: Mapped[str] = mapped_column(String(128), index=True)
    state: Mapped[str] = mapped_column(String(16), default="open")  # open | done | skipped | flagged | expired
    leased_at: Mapped[dt.datetime] = mapped_column(DateTime)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime)
    closed_at: Mapped[dt.datetime | None] = mapped_column(DateTime, default=None)
    __table_args__ = (
        Index("one_open_lease_per_prompt", "prompt_id", unique=True,
              sqlite_where=text("state = 'open'"), postgresql_where=text("state = 'open'")),
    )


class Ranking(Base):
    """A labeler's order of a prompt's completions, best first (completion ids)."""

    __tablename__ = "label_rankings"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("label_prompts.id"), index=True)
    labeler: Mapped[str] = mapped_column(String(128))
    order: Mapped[list[int]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)


class Mark(Base):
    """A skip (this labeler passes) or a flag (the prompt is taken out of the queue for review)."""

    __tablename__ = "label_marks"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("label_prompts.id"), index=True)
    labeler: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(8))  # skip | flag
    note: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)


@dataclass(frozen=True)
class Task:
    """What the ranking page shows: a prompt (text, and its messages when it was a chat), its completions
    (id, text) and the lease deadline."""

    prompt_id: int
    prompt: str
    completions: list[tuple[int, str]]
    expires_at: dt.datetime
    messages: list[dict] | None = None


@dataclass(frozen=True)
class RankingRow:
    ranking_id: int
    prompt_id: int
    prompt: str
    labeler: str
    created_at: dt.datetime
    ranked: list[str]  # completion texts, best first
    messages: list[dict] | None = None  # the prompt's messages, when it was a chat


class LabelStore:
    """The queue over one database. Thread-safe: each call opens its own session."""

    def __init__(self, url: str | None = None, *, rankings_per_prompt: int = 1,
                 lease_seconds: int = DEFAULT_LEASE_SECONDS, clock: Callable[[], dt.datetime] = _utcnow):
        if rankings_per_prompt < 1:
            raise LabelError("rankings_per_prompt must be at least 1")
        self.url = url or default_db_url()
        self.rankings_per_prompt = rankings_per_prompt
        self.lease_seconds = lease_seconds
        self.clock = clock
        connect_args = {"check_same_thread": False, "timeout": 30} if self.url.startswith("sqlite") else {}
        make_private(self.url)  # prompts and rankings: the owner's eyes only
        self.engine = create_engine(self.url, connect_args=connect_args)
        if self.url.startswith("sqlite"):
            # pysqlite's own BEGIN handling defers the write lock; take it at BEGIN so two concurrent
            # hand-outs serialise instead of both reading the same free prompt.
            @event.listens_for(self.engine, "connect")
            def _no_autobegin(conn, _record):
                conn.isolation_level = None

            @event.listens_for(self.engine, "begin")
            def _begin_immediate(conn):
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        Base.metadata.create_all(self.engine)
        self._add_missing_columns()
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    def _add_missing_columns(self) -> None:
        """Migrate a database made before `label_prompts.messages`: add the column; old rows keep their text."""
        if "messages" in {c["name"] for c in inspect(self.engine).get_columns("label_prompts")}:
            return
        try:
            with self.engine.begin() as conn:
                conn.execute(text("ALTER TABLE label_prompts ADD COLUMN messages JSON"))
        except DBAPIError:  # another process added it first
            if "messages" not in {c["name"] for c in inspect(self.engine).get_columns("label_prompts")}:
                raise

    # ------------------------------------------------------------------ filling

    def add_prompt(self, prompt: str, completions: list[str], *, messages: list[dict] | None = None,
                   source: str | None = None, model: str | None = None, params: dict | None = None) -> int:
        """Queue one prompt with its sampled completions; returns the prompt id. `messages`: the chat the
        completions answer (what the export writes as the prompt); `prompt` is then the text shown for it."""
        if len(completions) < 2:
            raise LabelError(f"{source or 'prompt'}: a ranking needs at least 2 completions, got {len(completions)}")
        with self._session.begin() as s:
            p = Prompt(text=prompt, messages=messages, source=source, created_at=self.clock())
            p.completions = [Completion(position=i, text=c, model=model, params=params) for i, c in enumerate(completions)]
            s.add(p)
            s.flush()
            return p.id

    # ------------------------------------------------------------------ handing out

    def next_task(self, labeler: str) -> Task | None:
        """The prompt this labeler should rank now, leased to them; None when their queue is empty.

        A labeler who already holds an open lease gets the same prompt back (a page reload does not
        burn through the queue)."""
        labeler = _check_labeler(labeler)
        now = self.clock()
        with self._session.begin() as s:
            self._expire(s, now)
            held = s.scalars(select(Assignment).where(Assignment.labeler == labeler, Assignment.state == "open")).first()
            if held is not None:
                held.expires_at = now + dt.timedelta(seconds=self.lease_seconds)
                return self._task(s, held)
            for pid in self._candidates(s, labeler):
                a = Assignment(prompt_id=pid, labeler=labeler, state="open", leased_at=now,
                               expires_at=now + dt.timedelta(seconds=self.lease_seconds))
                try:
                    with s.begin_nested():
                        s.add(a)
                except IntegrityError:
                    continue  # another process took it between our read and our insert
                return self._task(s, a)
        return None

    def _candidates(self, s: Session, labeler: str) -> list[int]:
        ranked = (select(Ranking.prompt_id).group_by(Ranking.prompt_id)
                  .having(func.count(Ranking.id) >= self.rankings_per_prompt))
        mine = select(Ranking.prompt_id).where(Ranking.labeler == labeler)
        flagged = select(Mark.prompt_id).where(Mark.kind == "flag")
        skipped = select(Mark.prompt_id).where(Mark.kind == "skip", Mark.labeler == labeler)
        leased = select(Assignment.prompt_id).where(Assignment.state == "open")
        q = (select(Prompt.id)
             .where(Prompt.id.not_in(ranked), Prompt.id.not_in(mine), Prompt.id.not_in(flagged),
                    Prompt.id.not_in(skipped), Prompt.id.not_in(leased))
             .order_by(Prompt.id).limit(20))
        return list(s.scalars(q))

    def _expire(self, s: Session, now: dt.datetime) -> None:
        for a in s.scalars(select(Assignment).where(Assignment.state == "open", Assignment.expires_at < now)):
            a.state, a.closed_at = "expired", now
        s.flush()

    def _task(self, s: Session, a: Assignment) -> Task:
        p = s.get(Prompt, a.prompt_id)
        # Shown in a per-prompt shuffled order so the sampling order (and its position bias) is hidden,
        # but stable across reloads.
        comps = sorted(p.completions, key=lambda c: (hash((p.id, c.id)) & 0xFFFF, c.id))
        return Task(p.id, p.text, [(c.id, c.text) for c in comps], a.expires_at, p.messages)

    def _lease(self, s: Session, labeler: str, prompt_id: int, now: dt.datetime) -> Assignment:
        self._expire(s, now)
        a = s.scalars(select(Assignment).where(Assignment.prompt_id == prompt_id, Assignment.state == "open")).first()
        if a is None or a.labeler != labeler:
            who = "nobody" if a is None else "another labeler"
            raise LabelError(f"prompt {prompt_id} is not leased to {labeler!r} (held by {who}; the lease may have "
                             f"expired after {self.lease_seconds} s); ask for the next prompt again")
        return a

    # ------------------------------------------------------------------ answers

    def submit_ranking(self, labeler: str, prompt_id: int, order: list[int]) -> int:
        """Record `order` (all of the prompt's completion ids, best first); closes the lease."""
        labeler = _check_labeler(labeler)
        now = self.clock()
        with self._session.begin() as s:
            a = self._lease(s, labeler, prompt_id, now)
            ids = [c.id for c in s.get(Prompt, prompt_id).completions]
            order = [int(x) for x in order]
            if sorted(order) != sorted(ids) or len(set(order)) != len(order):
                raise LabelError(f"prompt {prompt_id}: a ranking must order each of its completions {sorted(ids)} "
                                 f"exactly once (ties are not allowed); got {order}")
            r = Ranking(prompt_id=prompt_id, labeler=labeler, order=order, created_at=now)
            s.add(r)
            a.state, a.closed_at = "done", now
            s.flush()
            return r.id

    def skip(self, labeler: str, prompt_id: int) -> None:
        self._mark(labeler, prompt_id, "skip", None, "skipped")

    def flag(self, labeler: str, prompt_id: int, note: str | None = None) -> None:
        self._mark(labeler, prompt_id, "flag", note, "flagged")

    def _mark(self, labeler: str, prompt_id: int, kind: str, note: str | None, state: str) -> None:
        labeler = _check_labeler(labeler)
        now = self.clock()
        with self._session.begin() as s:
            a = self._lease(s, labeler, prompt_id, now)
            s.add(Mark(prompt_id=prompt_id, labeler=labeler, kind=kind, note=note, created_at=now))
            a.state, a.closed_at = state, now

    # ------------------------------------------------------------------ reading back

    def progress(self, labeler: str | None = None) -> dict:
        """Counts for the page: prompts in all, ranked (enough rankings), flagged, left in the queue, and
        this labeler's own rankings and skips."""
        with self._session() as s:
            total = s.scalar(select(func.count(Prompt.id)))
            per = dict(s.execute(select(Ranking.prompt_id, func.count(Ranking.id)).group_by(Ranking.prompt_id)).all())
            done = sum(1 for n in per.values() if n >= self.rankings_per_prompt)
            flagged_ids = set(s.scalars(select(Mark.prompt_id).where(Mark.kind == "flag")))
            flagged_open = len(flagged_ids - {p for p, n in per.items() if n >= self.rankings_per_prompt})
            out = {"prompts": total, "ranked": done, "flagged": len(flagged_ids),
                   "remaining": total - done - flagged_open, "rankings": sum(per.values())}
            if labeler:
                out["mine"] = s.scalar(select(func.count(Ranking.id)).where(Ranking.labeler == labeler))
                out["my_skips"] = s.scalar(select(func.count(Mark.id)).where(Mark.labeler == labeler, Mark.kind == "skip"))
            return out

    def rankings(self) -> Iterator[RankingRow]:
        """Every ranking in the order it was made, with completion texts best first."""
        with self._session() as s:
            for r in s.scalars(select(Ranking).order_by(Ranking.id)):
                p = s.get(Prompt, r.prompt_id)
                by_id = {c.id: c.text for c in p.completions}
                yield RankingRow(r.id, p.id, p.text, r.labeler, r.created_at, [by_id[i] for i in r.order], p.messages)

    def open_leases(self) -> list[tuple[int, str]]:
        """(prompt_id, labeler) for every lease currently held."""
        with self._session.begin() as s:
            self._expire(s, self.clock())
            return [(a.prompt_id, a.labeler) for a in s.scalars(select(Assignment).where(Assignment.state == "open"))]


def _check_labeler(labeler: str) -> str:
    name = (labeler or "").strip()
    if not name or len(name) > 128:
        raise LabelError("a labeler name is required (1-128 characters); enter your name on the page")
    return name
