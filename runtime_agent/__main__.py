"""``python -m runtime_agent``: the same as the ``heartbeat-agent`` command."""

from __future__ import annotations

from .cli import main

raise SystemExit(main())
