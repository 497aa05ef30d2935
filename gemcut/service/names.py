"""The names a finished job and its checkpoints are served by (OpenAI's shapes).

    fine_tuned_model_name(job)        # ft:smollm2-135m-instruct:alice:my-suffix:3Zq...
    checkpoint_model_name(job, 40)    # ft:smollm2-135m-instruct:alice:my-suffix:3Zq...:ckpt-step-40
"""

from __future__ import annotations

from gemcut.service.db import JobRow

JOB_PREFIX = "ftjob-"


def fine_tuned_model_name(job: JobRow) -> str:
    """`ft:{base}:{owner}:{suffix}:{job id without ftjob-}`: unique, since the job id is."""
    return f"ft:{job.model}:{job.owner}:{job.suffix or ''}:{job.id.removeprefix(JOB_PREFIX)}"


def checkpoint_model_name(job: JobRow, step: int) -> str:
    return f"{fine_tuned_model_name(job)}:ckpt-step-{step}"
