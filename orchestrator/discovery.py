"""How the CLI's client commands find a running orchestrator without being told where it is.

``heartbeat-orchestrator run`` leaves a small note in its working directory,
``heartbeat-orchestrator.json``: the broker URL its clients should use (the
embedded broker's ``--listen`` address, or ``--broker`` without its
password), the topic prefix, the SQLite database and the CA file.
``alerts``, ``status``, ``history`` and the maintenance commands run in the
same directory read it for whatever their flags, ``HEARTBEAT_*`` variables
and ``--config`` leave unsaid (see :func:`orchestrator.config.load_config`).
The note holds nothing secret; a password still comes from the URL you give
or from ``HEARTBEAT_BROKER_PASSWORD``. It is removed when the orchestrator
stops, and ignored once its process is gone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from .config import Config

log = logging.getLogger("orchestrator")

NOTE: Final = "heartbeat-orchestrator.json"
_KEYS: Final = ("broker", "prefix", "db", "tls_ca")
"""What a client takes from the note: options of :class:`Config`, each a string."""


def note_of(config: Config) -> dict[str, Any]:
    """The note's content for an orchestrator running with ``config``."""
    note: dict[str, Any] = {
        "pid": os.getpid(),
        "started_at": time.time(),
        "broker": config.client_address().url,  # without the password
        "prefix": config.prefix,
    }
    if config.db.startswith("sqlite:///"):  # a PostgreSQL URL may carry a password: clients give their own
        note["db"] = "sqlite:///" + str(Path(config.db.removeprefix("sqlite:///")).resolve())
    if config.tls_ca is not None:
        note["tls_ca"] = str(Path(config.tls_ca).resolve())
    return note


@contextlib.contextmanager
def left_note(config: Config, directory: Path | None = None) -> Iterator[Path | None]:
    """Write the note for the time the orchestrator runs; remove it after (only if it is still ours).

    A directory we may not write in is no reason to stop: the clients then
    need ``--broker`` or ``--config``, as they would without a note.
    """
    path = (directory or Path.cwd()) / NOTE
    content = note_of(config)
    try:
        temporary = path.with_name(f".{NOTE}.{os.getpid()}")
        temporary.write_text(json.dumps(content, indent=2) + "\n")
        temporary.replace(path)  # readers never see half a note
    except OSError as exc:
        log.info("could not leave %s for the CLI's client commands: %s", path, exc.strerror or exc)
        yield None
        return
    try:
        yield path
    finally:
        if (read_note(path, check_pid=False) or {}).get("pid") == os.getpid():
            with contextlib.suppress(OSError):
                path.unlink()


def read_note(path: Path | None = None, *, check_pid: bool = True) -> dict[str, Any] | None:
    """The note of an orchestrator running from ``path``'s directory (default: here), or None.

    None when there is no note, it does not parse, or (``check_pid``) its
    process is gone: a note left by a killed orchestrator must not send a
    client to a broker that no longer exists.
    """
    path = path or Path.cwd() / NOTE
    try:
        note = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(note, dict) or not isinstance(note.get("pid"), int):
        return None
    if check_pid and not _running(note["pid"]):
        return None
    return note


def discovered(path: Path | None = None) -> dict[str, str]:
    """The options a client takes from the running orchestrator's note (empty without one)."""
    note = read_note(path) or {}
    return {key: note[key] for key in _KEYS if isinstance(note.get(key), str)}


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True
