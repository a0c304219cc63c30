"""What a user must see without configuring anything: a kernel being compiled (so a first call is
not mistaken for a hang), a wait for another process's compile, a damaged cache entry."""
from __future__ import annotations

import logging
import sys

log = logging.getLogger("flashjit")


def notify(message: str, level: int = logging.INFO) -> None:
    """If the application configured logging, the flashjit logger gets `message` at `level` and the
    application decides; otherwise the line goes to stderr with the one "[flashjit] " prefix
    (messages carry no prefix of their own)."""
    if log.hasHandlers():
        log.log(level, message)
    else:
        print(f"[flashjit] {message}", file=sys.stderr, flush=True)
