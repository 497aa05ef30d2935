"""The labeling queue: leases (one labeler per prompt at a time), expiry, skips, flags, rankings, concurrency."""

from __future__ import annotations

import datetime as dt
import threading

import pytest

from gemcut.label.store import LabelError, LabelStore


class Clock:
    def __init__(self):
        self.now = dt.datetime(2024, 5, 1, 12, 0, 0)

    def __call__(self):
        return self.now

    def advance(self, seconds: float):
        self.now += dt.timedelta(seconds=seconds)


@pytest.fixture()
def clock():
    return Clock()


def make_store(tmp_path, clock, n_prompts=3, **kw) -> LabelStore:
    store = LabelStore(f"sqlite:///{tmp_path / 'q.db'}", clock=clock, lease_seconds=60, **kw)
    for i in range(n_prompts):
        store.add_prompt(f"prompt {i}", [f"a{i}", f"b{i}", f"c{i}"], source=f"p.jsonl:{i + 1}")
    return store


def order_of(task, texts):
    by_text = {t: cid for cid, t in task.completions}
    return [by_text[t] for t in texts]


def test_two_labelers_never_hold_the_same_prompt(tmp_path, clock):
    store = make_store(tmp_path, clock)
    a, b = store.next_task("alice"), store.next_task("bob")
    assert a.prompt_id != b.prompt_id
    assert store.next_task("alice").prompt_id == a.prompt_id  # asking again (a reload) returns the same lease
    assert sorted(store.open_leases()) == sorted([(a.prompt_id, "alice"), (b.prompt_id, "bob")])
    with pytest.raises(LabelError, match="not leased to 'bob'"):
        store.submit_ranking("bob", a.prompt_id, [c for c, _ in a.completions])


def test_ranking_closes_the_lease_and_counts(tmp_path, clock):
    store = make_store(tmp_path, clock)
    t = store.next_task("alice")
    store.submit_ranking("alice", t.prompt_id, order_of(t, ["c0", "a0", "b0"]))
    rows = list(store.rankings())
    assert len(rows) == 1 and rows[0].ranked == ["c0", "a0", "b0"] and rows[0].labeler == "alice"
    assert rows[0].created_at == clock.now
    assert store.progress("alice") == {"prompts": 3, "ranked": 1, "flagged": 0, "remaining": 2, "rankings": 1, "mine": 1, "my_skips": 0}
    assert store.next_task("alice").prompt_id != t.prompt_id


def test_a_ranking_must_order_every_completion_once(tmp_path, clock):
    store = make_store(tmp_path, clock)
    t = store.next_task("alice")
    ids = [c for c, _ in t.completions]
    with pytest.raises(LabelError, match="ties are not allowed"):
        store.submit_ranking("alice", t.prompt_id, [ids[0], ids[0], ids[1]])
    with pytest.raises(LabelError, match="exactly once"):
        store.submit_ranking("alice", t.prompt_id, ids[:2])
    with pytest.raises(LabelError, match="exactly once"):
        store.submit_ranking("alice", t.prompt_id, ids + [999])
    with pytest.raises(LabelError, match="at least 2 completions"):
        store.add_prompt("x", ["only one"])
    with pytest.raises(LabelError, match="labeler name"):
        store.next_task("  ")


def test_an_expired_lease_returns_the_prompt_to_the_queue(tmp_path, clock):
    store = make_store(tmp_path, clock, n_prompts=1)
    t = store.next_task("alice")
    assert store.next_task("bob") is None  # the only prompt is leased
    clock.advance(61)
    t_bob = store.next_task("bob")
    assert t_bob is not None and t_bob.prompt_id == t.prompt_id
    with pytest.raises(LabelError, match="lease may have expired"):
        store.submit_ranking("alice", t.prompt_id, [c for c, _ in t.completions])
    store.submit_ranking("bob", t.prompt_id, [c for c, _ in t_bob.completions])


def test_skip_is_per_labeler_and_flag_is_for_everyone(tmp_path, clock):
    store = make_store(tmp_path, clock, n_prompts=2)
    t1 = store.next_task("alice")
    store.skip("alice", t1.prompt_id)
    t2 = store.next_task("alice")
    assert t2.prompt_id != t1.prompt_id  # alice does not get what she skipped
    assert store.next_task("bob").prompt_id == t1.prompt_id  # bob does
    store.flag("alice", t2.prompt_id, "offensive")
    assert store.next_task("alice") is None
    p = store.progress("alice")
    assert p["flagged"] == 1 and p["remaining"] == 1 and p["my_skips"] == 1


def test_several_rankings_per_prompt(tmp_path, clock):
    store = make_store(tmp_path, clock, n_prompts=1, rankings_per_prompt=2)
    t = store.next_task("alice")
    store.submit_ranking("alice", t.prompt_id, [c for c, _ in t.completions])
    assert store.next_task("alice") is None  # one ranking per labeler
    t_bob = store.next_task("bob")
    assert t_bob.prompt_id == t.prompt_id
    store.submit_ranking("bob", t.prompt_id, [c for c, _ in t_bob.completions][::-1])
    assert store.next_task("carol") is None and store.progress()["ranked"] == 1


def test_completions_are_shown_in_a_stable_shuffled_order(tmp_path, clock):
    store = make_store(tmp_path, clock, n_prompts=6)
    orders = []
    for i in range(6):
        t = store.next_task(f"l{i}")
        assert store.next_task(f"l{i}").completions == t.completions  # stable across reloads
        orders.append(tuple(text[0] for _, text in t.completions))
    assert len(set(orders)) > 1  # not always the sampling order


def test_concurrent_labelers_on_two_connections_get_distinct_prompts(tmp_path, clock):
    url = f"sqlite:///{tmp_path / 'c.db'}"
    seed = LabelStore(url, clock=clock)
    for i in range(20):
        seed.add_prompt(f"p{i}", ["x", "y"])
    stores = [LabelStore(url, clock=clock), LabelStore(url, clock=clock)]  # like two server processes
    got, errors = {}, []
    barrier = threading.Barrier(10)

    def work(i):
        try:
            barrier.wait()
            task = stores[i % 2].next_task(f"labeler{i}")
            got[i] = task.prompt_id
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(10)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert len(set(got.values())) == 10


def test_the_database_itself_refuses_a_second_open_lease(tmp_path, clock):
    from sqlalchemy.exc import IntegrityError
    from sqlalchemy.orm import Session

    from gemcut.label.store import Assignment

    store = make_store(tmp_path, clock, n_prompts=1)
    t = store.next_task("alice")
    with Session(store.engine) as s, pytest.raises(IntegrityError):
        s.add(Assignment(prompt_id=t.prompt_id, labeler="mallory", state="open", leased_at=clock.now, expires_at=clock.now))
        s.commit()
