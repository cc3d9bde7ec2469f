"""One lock for processes that must take turns at something on this machine (no heavy imports: `orchestrate
status` imports this without torch)."""
from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path


@contextlib.contextmanager
def taking_turns(lock_file: Path):
    """Processes that need one thing done once (a cache entry made, a store created) take turns: the first does
    it, the others wait, then find it done. The lock is released when its file closes, also if the process
    holding it dies."""
    with open(lock_file, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
