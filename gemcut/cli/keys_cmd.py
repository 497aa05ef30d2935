"""`gemcut keys create|list|revoke`: owners' API keys for the fine-tuning service, in its job store.

    gemcut keys create alice                      # prints the key once; only its hash is kept
    gemcut keys create ops --admin --jobs-db postgresql+psycopg://gemcut@db/gemcut
    gemcut keys list
    gemcut keys revoke gk-alice-Ab12C
"""

from __future__ import annotations

import typer

from gemcut.cli import app

keys_app = typer.Typer(help="Owners' API keys for the fine-tuning service (each key sees only its owner's files, jobs and models).",
                       no_args_is_help=True)
app.add_typer(keys_app, name="keys")

JOBS_DB_HELP = "SQLAlchemy URL of the job store (default: SQLite in the service root)."
ROOT_HELP = "The service folder (default $GEMCUT_HOME/service)."


def _keyring(jobs_db: str | None, service_root: str | None):
    from gemcut.service.keys import KeyRing
    from gemcut.service.settings import ServiceSettings
    from gemcut.service.store import ServiceStore

    settings = ServiceSettings(service_root=service_root, jobs_db_url=jobs_db)
    settings.layout().ensure()
    return KeyRing(ServiceStore(settings.jobs_db()).sessions)


@keys_app.command("create")
def create(owner: str = typer.Argument(..., help="The owner the key acts for (letters, digits, - and _)."),
           admin: bool = typer.Option(False, "--admin", help="The key sees and touches every owner's files, jobs and models."),
           jobs_db: str | None = typer.Option(None, "--jobs-db", help=JOBS_DB_HELP),
           service_root: str | None = typer.Option(None, "--service-root", help=ROOT_HELP)) -> None:
    """Make a key for OWNER and print it (the only time it is shown)."""
    key = _keyring(jobs_db, service_root).create(owner, admin=admin)
    typer.echo(key)
    typer.echo(f"(the key of {owner}{', admin' if admin else ''}; only its hash is stored: keep it now)", err=True)


@keys_app.command("list")
def list_keys(jobs_db: str | None = typer.Option(None, "--jobs-db", help=JOBS_DB_HELP),
              service_root: str | None = typer.Option(None, "--service-root", help=ROOT_HELP)) -> None:
    """The keys by owner: their shown prefix, admin or not, when made, revoked or not."""
    for info in _keyring(jobs_db, service_root).list():
        flags = " ".join(f for f, on in (("admin", info.admin), ("revoked", info.revoked)) if on)
        typer.echo(f"{info.prefix}…\t{info.owner}\t{info.created_at}\t{flags}".rstrip())


@keys_app.command("revoke")
def revoke(prefix: str = typer.Argument(..., help="The key's prefix as `gemcut keys list` shows it (without …)."),
           jobs_db: str | None = typer.Option(None, "--jobs-db", help=JOBS_DB_HELP),
           service_root: str | None = typer.Option(None, "--service-root", help=ROOT_HELP)) -> None:
    """Revoke a key: requests with it get 401 from then on."""
    count = _keyring(jobs_db, service_root).revoke(prefix.rstrip("…"))
    if not count:
        from gemcut.errors import GemcutError

        raise GemcutError(f"no live key has the prefix {prefix!r}; `gemcut keys list` shows them")
    typer.echo(f"revoked {count} key(s)")
