"""Database URLs that several machines share: the queue (``--queue postgresql://...``) and a
tracking store given as a database. Each is checked before anything is written anywhere: its
driver is installed, the database answers and accepts the login, and a shared queue is not
paired with a tracking store only this machine can see. Every failure is one sentence (a
``UserError``) that never shows a password.
"""

from __future__ import annotations

from .errors import UserError

EXTRA = "pip install 'resnet-ablate[postgres]'"
#: Tracking URIs that live on this machine only: an embedded SQLite file or a file store.
LOCAL_SCHEMES = ("sqlite:", "file:")


def is_database(url: str | None) -> bool:
    """Whether a ``--queue`` or ``--tracking-uri`` names a database server (not a file or a
    tracking server)."""
    if not url or "://" not in url:
        return False
    return not url.startswith(("http://", "https://", *LOCAL_SCHEMES))


def masked(url: str) -> str:
    """The URL as it may be printed: its password replaced by ``***``."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url.split("@", 1)[-1] if "@" in url else url


def check_driver(url: str, option: str) -> None:
    """The Python driver of a database URL is importable; else say which extra brings it."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        make_url(url).get_dialect().import_dbapi()
    except (ArgumentError, NoSuchModuleError):
        raise UserError(
            f"{option} {masked(url)}: not a database URL this tool knows; use "
            f"postgresql://USER:PASSWORD@HOST:PORT/DATABASE"
        ) from None
    except ImportError as err:
        raise UserError(
            f"{option} {masked(url)}: the database driver is not installed ({err}); "
            f"{EXTRA} and use a postgresql:// URL"
        ) from None


def check_connection(url: str, option: str) -> None:
    """The database answers and accepts the login (a wrong password, a server that is down)."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    engine = sqlalchemy.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.SQLAlchemyError as err:
        reason = _reason(err)
        raise UserError(
            f"{option} {masked(url)}: the database cannot be used ({reason}); check the host, "
            f"port, user and password, and that the server runs"
        ) from None
    finally:
        engine.dispose()


def _reason(err: Exception) -> str:
    """The driver's own words, on one line, without SQLAlchemy's background link."""
    original = getattr(err, "orig", None) or err
    lines = [line.strip() for line in str(original).splitlines() if line.strip()]
    text = " ".join(lines[:2]) if lines else type(original).__name__
    return text.split("(Background on this error", 1)[0].strip()


def check_shared(queue: str | None, tracking_uri: str) -> None:
    """A queue shared by machines needs a tracking store every machine writes to: with a local
    one each machine would record only its own cells and each report would miss the rest."""
    if is_database(queue) and tracking_uri.startswith(LOCAL_SCHEMES):
        raise UserError(
            f"--queue {masked(str(queue))} is shared by machines but the tracking store "
            f"{tracking_uri} is local to this one; pass --tracking-uri http://HOST:5000 (an "
            f"`mlflow server` every machine reaches; see README, Several machines)"
        )


def check_urls(queue: str | None, tracking_uri: str) -> None:
    """Everything above for a run's ``--queue`` and resolved tracking URI, before any write."""
    check_shared(queue, tracking_uri)
    for url, option in ((queue, "--queue"), (tracking_uri, "--tracking-uri")):
        if url is not None and is_database(url):
            check_driver(url, option)
            check_connection(url, option)
