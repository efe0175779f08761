"""One supervised child process: started from a settings file, watched, stopped without orphans.

A launcher never renders its settings into command-line flags. Before each start (the first
and every restart) a :class:`ManagedProcess` calls its settings writer with the port the child
must use; the writer dumps the child's settings object (:class:`~collage_inference.config.
WorkerSettings`, or the front end's :class:`~collage_inference.config.ServeConfig`) to a JSON
file, and the child is started as ``python -c _CHILD MODULE --config FILE``. The child reads the
very object the launcher built, and nothing secret (the token) ever reaches ``ps``: a settings
file holds the token file's path, never the token.

The child prints ``ready on http://HOST:PORT`` once it listens (the launcher learns a port-0
child's port from it), exits with :attr:`ListenError.exit_code <collage_inference.errors.
ListenError>` when its port is taken and with 2 on any other startup failure, so the launcher
decides how to restart it from the exit code, not from the wording of its log.

**No orphans.** Each child runs in its own session (``start_new_session``), so a terminal's
Ctrl-C reaches only the launcher, which then stops its children itself. If the launcher dies,
even by SIGKILL, the children still go: each runs under :func:`run_child`, a small bootstrap that
holds a pipe from the launcher on stdin and sends itself SIGTERM when the pipe reaches
end-of-file, which the kernel guarantees when the launcher exits for any reason. Unlike
``PR_SET_PDEATHSIG`` this is portable and does not depend on which launcher thread started the
child.
"""

from __future__ import annotations

import contextlib
import os
import runpy
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import collage_inference
from collage_inference.errors import WorkerError
from collage_inference.serving.web.server import READY_PREFIX

LOG_LINES = 200  # output lines kept per process, for error messages

_CHILD = "import collage_inference.deploy.process as p; p.run_child()"

SettingsWriter = Callable[[int], Path]
"""Writes a child's settings for the given port (0: any free one) and returns the file."""


def run_child() -> None:
    """Entry of every launched process (``python -c _CHILD MODULE ARGS``): run MODULE as
    ``__main__``, and SIGTERM ourselves when the launcher's pipe on stdin reaches end-of-file,
    i.e. when the launcher is gone, however it went."""
    threading.Thread(target=_watch_launcher, name="launcher-watch", daemon=True).start()
    sys.argv = sys.argv[1:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)


def _watch_launcher() -> None:
    # os.read on the raw fd, not sys.stdin: a daemon thread holding the stdin buffer's lock can
    # abort interpreter shutdown.
    with contextlib.suppress(OSError):
        while os.read(0, 4096):
            pass
    os.kill(os.getpid(), signal.SIGTERM)
    threading.Event().wait(15.0)  # a graceful exit ends the process before this does
    os._exit(1)


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not: it has exited and awaits its reaper)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def process_tree(pid: int) -> set[int]:
    """``pid`` and its live descendants (from /proc; just ``pid`` where there is no /proc)."""
    children: dict[int, list[int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
                    if fields[0] != "Z":
                        children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = set(), [pid]
    while todo:
        current = todo.pop()
        if current not in tree:
            tree.add(current)
            todo.extend(children.get(current, []))
    return tree


class ManagedProcess:
    """One child process: started in its own session, output kept (last lines), ready line parsed.

    ``write_settings(port)`` writes the child's settings file before each start. ``port`` is 0
    until the first ready line; restarts reuse it so the URL never changes. A tool driven by
    flags rather than a settings file overrides :meth:`arguments`.
    """

    def __init__(
        self,
        name: str,
        module: str,
        write_settings: SettingsWriter | None,
        port: int = 0,
        log_dir: Path | None = None,
        echo: Callable[[str], None] | None = None,
        model: Path | None = None,
        note: str = "",
    ) -> None:
        self.name, self.module, self.write_settings, self.port = name, module, write_settings, port
        self.model, self.note = model, note  # the model file it serves; how it straggles
        self.url: str | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.pids: list[int] = []  # every pid this process has had, restarts included
        self.restarts: list[float] = []  # monotonic times of restarts
        self.expected = False  # True while it should be running (the supervisor restarts it)
        self._log: deque[str] = deque(maxlen=LOG_LINES)
        self._log_dir, self._echo = log_dir, echo
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None

    def arguments(self) -> list[str]:
        """The child's arguments: ``--config FILE``, the file written now for :attr:`port`."""
        if self.write_settings is None:
            raise TypeError(f"{self.name} has no settings writer; override arguments()")
        return ["--config", str(self.write_settings(self.port))]

    def start(self) -> None:
        """Write its settings and spawn the child; returns at once (see :func:`wait_all_ready`)."""
        old = self.proc
        if old is not None and old.poll() is not None and old.stdin and not old.stdin.closed:
            old.stdin.close()  # a restart: release the dead one's pipe
        cmd = [sys.executable, "-c", _CHILD, self.module, *self.arguments()]
        src = str(Path(collage_inference.__file__).resolve().parents[1])
        path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
        self._ready = ready = threading.Event()
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=env, start_new_session=True,
        )  # fmt: skip
        self.proc, self.expected = proc, True
        self.pids.append(proc.pid)
        self._reader = threading.Thread(target=self._read, args=(proc, ready), name=f"log-{self.name}")
        self._reader.daemon = True
        self._reader.start()

    def _read(self, proc: subprocess.Popen[bytes], ready: threading.Event) -> None:
        assert proc.stdout is not None
        log_file = (self._log_dir / f"{self.name}.log").open("a") if self._log_dir else None
        try:
            for raw in iter(proc.stdout.readline, b""):
                line = raw.decode(errors="replace").rstrip()
                self._log.append(line)
                if log_file:
                    log_file.write(line + "\n")
                    log_file.flush()
                if self._echo:
                    self._echo(f"[{self.name}] {line}")
                if not ready.is_set() and line.startswith(READY_PREFIX):
                    self.url = line[len(READY_PREFIX) :].strip()
                    self.port = urlsplit(self.url).port or self.port
                    ready.set()
        finally:
            proc.stdout.close()
            if log_file:
                log_file.close()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self.alive

    @property
    def exit_code(self) -> int | None:
        """The last child's exit status; None while it runs or before it started."""
        return self.proc.poll() if self.proc else None

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(list(self._log)[-lines:]) or "(no output)"

    def check_ready(self) -> bool:
        """True once ready; raises WorkerError (with its last log lines) if it died first."""
        if self._ready.is_set():
            return True
        if self.proc is not None and self.proc.poll() is not None:
            if self._reader:
                self._reader.join(timeout=2.0)  # collect its last words
            raise WorkerError(
                f"{self.name} exited with code {self.proc.returncode} before it was ready; "
                f"its last output:\n{self.log_tail()}"
            )
        return False

    def signal(self, sig: int, group: bool = False) -> None:
        """Send ``sig`` to the process (or its whole process group) if it is still running."""
        if not self.alive or self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig) if group else self.proc.send_signal(sig)

    def terminate(self) -> None:
        """Ask it to stop (SIGTERM); the supervisor will not restart it."""
        self.expected = False
        self.signal(signal.SIGTERM)

    def reap(self, deadline: float) -> int | None:
        """Wait until ``deadline`` for it to exit, then SIGKILL its process group; its exit code."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL, group=True)
            return self.proc.wait()
        finally:
            if self._reader:
                self._reader.join(timeout=2.0)
            if self.proc.stdin and not self.proc.stdin.closed:
                self.proc.stdin.close()  # only now: closing it earlier would send a second SIGTERM


def wait_all_ready(procs: list[ManagedProcess], timeout: float, aborted: Callable[[], bool]) -> None:
    """Wait for every process's ready line; fail fast, naming the first that dies."""
    deadline = time.monotonic() + timeout
    pending = list(procs)
    while pending:
        pending = [p for p in pending if not p.check_ready()]
        if not pending:
            return
        if aborted():
            raise WorkerError("stopped while starting")
        if time.monotonic() > deadline:
            names = ", ".join(p.name for p in pending)
            raise WorkerError(
                f"{names} not ready within {timeout:.0f}s (raise ready_timeout on a busy machine); "
                f"last output of {pending[0].name}:\n{pending[0].log_tail()}"
            )
        time.sleep(0.05)
