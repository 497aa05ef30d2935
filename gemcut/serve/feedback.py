"""Feedback on answers, and the way back to training: logged traffic exported as new data.

    POST /v1/feedback {"response_id": "chatcmpl-…", "rating": "up" | "down", "comment": "…"}
    gemcut monitor --export-data data/from_serving/       # writes the files below

Export (needs the server to have run with `log_prompts`, since text is only stored then):
- `sft.jsonl`: `messages` records (the logged conversation + the answer) for answers rated up;
- `preference.jsonl`: `prompt`/`chosen`/`rejected` records where the same prompt got an up- and a
  down-rated answer (single-turn prompts only: `prompt` is the user's text, `system` the system message);
- `prompts.jsonl`: every logged chat prompt without an answer, as `messages` records ending in a user
  turn, for labeling or rejection sampling.
Rows that cannot be exported (no text logged, classify requests) are counted in `export_report.json`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import ConfigDict, Field

from gemcut.serve.errors import APIError
from gemcut.serve.limits import UnicodeChecked
from gemcut.serve.store import Store

router = APIRouter(prefix="/v1")


class FeedbackRequest(UnicodeChecked):
    model_config = ConfigDict(extra="forbid")

    response_id: str = Field(min_length=1, max_length=64, description="The `id` of a chat or completion response.")
    rating: Literal["up", "down", 1, -1] = Field(description="Thumbs up ('up' or 1) or down ('down' or -1).")
    comment: str | None = Field(None, max_length=4000)
    choice_index: int = Field(0, ge=0, le=1023, description="Which of the n choices the rating is about.")


@router.post("/feedback")
def post_feedback(body: FeedbackRequest, request: Request) -> dict:
    store: Store = request.app.state.store
    rating = 1 if body.rating in ("up", 1) else -1
    fid = store.add_feedback(body.response_id, rating, body.comment, body.choice_index)
    if fid is None:
        raise APIError(404, f"no logged response has id {body.response_id!r} (responses older than the retention are deleted)",
                       param="response_id", code="response_not_found")
    return {"id": f"fb-{fid}", "object": "feedback", "response_id": body.response_id, "rating": body.rating}


def _conversation(prompt_text: str | None) -> list[dict] | str | None:
    if prompt_text is None:
        return None
    return json.loads(prompt_text)


def _single_turn(conv) -> dict | None:
    """{"prompt", optional "system"} for a string prompt or a [system?, user] conversation; else None."""
    if isinstance(conv, str):
        return {"prompt": conv}
    roles = [m["role"] for m in conv]
    if roles == ["user"]:
        return {"prompt": conv[0]["content"]}
    if roles == ["system", "user"]:
        return {"prompt": conv[1]["content"], "system": conv[0]["content"]}
    return None


def export_training_data(store: Store, out_dir: str | Path, since: datetime | None = None) -> dict:
    """Write sft.jsonl, preference.jsonl, prompts.jsonl and export_report.json; returns the report."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    skipped: dict[str, int] = defaultdict(int)
    sft, prompts = [], []
    by_prompt: dict[str, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    for fb, req in store.feedback_with_requests(since):
        if req.prompt_text is None or req.response_text is None:
            skipped["feedback_without_logged_text"] += 1
            continue
        if req.endpoint == "classify":
            skipped["feedback_on_classify"] += 1
            continue
        if fb.choice_index != 0:
            skipped["feedback_on_choice_other_than_first"] += 1  # only the first choice's text is logged
            continue
        conv = _conversation(req.prompt_text)
        if fb.rating > 0:
            if isinstance(conv, list):
                sft.append({"messages": conv + [{"role": "assistant", "content": req.response_text}], "_source": f"serve:{req.response_id}"})
            else:
                sft.append({"prompt": conv, "completion": req.response_text, "_source": f"serve:{req.response_id}"})
        by_prompt[req.prompt_text][fb.rating].append(req.response_text)
    pref = []
    for prompt_text, ratings in by_prompt.items():
        ups, downs = ratings.get(1, []), ratings.get(-1, [])
        if not ups or not downs:
            continue
        single = _single_turn(_conversation(prompt_text))
        if single is None:
            skipped["preference_pair_from_multi_turn_prompt"] += len(ups) * len(downs)
            continue
        for chosen in dict.fromkeys(ups):
            for rejected in dict.fromkeys(downs):
                if chosen != rejected:
                    pref.append({**single, "chosen": chosen, "rejected": rejected})
    seen = set()
    for req in store.requests(since=since, ok_only=True):
        if req.endpoint != "chat":
            continue
        if req.prompt_text is None:
            skipped["request_without_logged_text"] += 1
            continue
        if req.prompt_text in seen:
            skipped["duplicate_prompt"] += 1
            continue
        seen.add(req.prompt_text)
        prompts.append({"messages": _conversation(req.prompt_text), "_source": f"serve:{req.response_id}"})
    files = {"sft.jsonl": sft, "preference.jsonl": pref, "prompts.jsonl": prompts}
    for fname, rows in files.items():
        with open(out / fname, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    report = {"written": {k: len(v) for k, v in files.items()}, "skipped": dict(skipped)}
    (out / "export_report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report
