"""Live Python stacks, for hang reports: another process's through ``py-spy dump``, this
process's through the interpreter. ``profiles/dump.py`` and the engine's watchdog share it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import traceback


def pyspy_path() -> str | None:
    """The py-spy executable: on PATH, or next to this interpreter (a virtualenv's bin)."""
    found = shutil.which("py-spy")
    if found:
        return found
    beside = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return beside if os.path.exists(beside) else None


def dump_stacks(pid: int, native: bool = False, timeout_s: float = 30.0) -> str:
    """``py-spy dump`` of process ``pid`` (every thread, innermost frame first), or a line
    that says why there is none.

    Example:
        >>> print(dump_stacks(worker_pid))   # ... step_chunk (my_env.py:88)
    """
    pyspy = pyspy_path()
    if pyspy is None:
        return "(no stack: py-spy not found; pip install py-spy)"
    cmd = [pyspy, "dump", "--pid", str(pid)] + (["--native"] if native else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"(no stack: py-spy failed: {exc!r})"
    text = (out.stdout + out.stderr).strip()
    return text if out.returncode == 0 else f"(py-spy exit {out.returncode}) {text}"


def own_stacks() -> str:
    """Every thread of this process, innermost frame last (the inference loop's side)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        parts.append(f'Thread {ident} "{names.get(ident, "?")}":')
        parts.append("".join(traceback.format_stack(frame)).rstrip())
    return "\n".join(parts)
