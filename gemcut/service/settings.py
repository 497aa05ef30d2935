"""Settings of a server that is also the fine-tuning service: the inference server's, plus where jobs live.

    gemcut serve --model smollm2-135m-instruct --workers 1 --service-root /srv/gemcut --db-jobs postgresql+psycopg://...
    gemcut serve --config serve.yaml          # the same keys in YAML

Every field is a `gemcut serve` option or a YAML key (gemcut/serve/settings.py has the inference ones).
"""

from __future__ import annotations

from pydantic import Field

from gemcut.models.registry import ALIASES
from gemcut.serve.settings import ServeSettings
from gemcut.service.layout import ServiceLayout, default_root


class ServiceSettings(ServeSettings):
    service_root: str | None = Field(None, description="The service folder: uploaded files and one run folder per job "
                                                       "(shared by every worker); default $GEMCUT_HOME/service.")
    jobs_db_url: str | None = Field(None, description="SQLAlchemy URL of the job store (files, jobs, events, owners' keys); "
                                                      "default SQLite in the service folder. Several workers on several machines: "
                                                      "postgresql+psycopg://user:password@host/db.")
    workers: int = Field(1, ge=0, description="Job workers run inside the server; 0 leaves the jobs to `gemcut worker` processes.")
    max_concurrent_jobs: int = Field(1, ge=1, description="Jobs one worker runs at a time (1 on a CPU: two jobs would share its cores).")
    job_lease_s: float = Field(30.0, gt=0, description="A worker that has not heartbeated for this long loses its job to another worker.")
    max_upload_bytes: int = Field(512 * 1024 * 1024, ge=1024, description="Largest file accepted by POST /v1/files (512 MiB); "
                                                                          "bigger uploads get 413.")
    finetune_models: list[str] = Field(default_factory=lambda: sorted(ALIASES),
                                       description="Model names a job may start from besides the served ones (and the caller's own "
                                                   "fine-tuned models); default: the packaged models. Never a path from a request.")

    def layout(self) -> ServiceLayout:
        return ServiceLayout(self.service_root or default_root())

    def jobs_db(self) -> str:
        return self.jobs_db_url or self.layout().default_db_url
