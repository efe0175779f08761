"""The local launcher: a whole collage-inference deployment on one machine, in real processes.

    collage serve --mode collage --grid 3          # 9 s-CNN workers, 1 collage worker, front end
    collage serve --config examples/cluster.toml   # only the front end, over remote V2 servers

:class:`LocalCluster` starts the s-CNN workers (``mode.scnn_workers(k)`` of them), the collage
worker(s) (one per served grid) and the front end as separate processes on loopback, and is the
Python API the tests and the benchmark harness use::

    with LocalCluster(load_config(overrides={"port": 0})) as cluster:
        cluster.url, cluster.worker_urls, cluster.kill_worker(0)

Why it is built this way:

* **Ports.** Workers bind port 0 and the launcher reads their ``ready on URL`` line, so parallel
  clusters never collide. All workers start at once (import and model load overlap) and the
  front end starts once they are ready, with their URLs as flags.
* **Supervision.** A thread polls the children; one that dies is restarted *on the same port*
  (``--port`` given explicitly), so the front end keeps its URL and its readiness probe brings
  the worker back without any reconfiguration. If that port has been taken meanwhile, the
  worker starts on a free port and the launcher tells the front end its new address
  (``PUT /admin/workers/{id}``). A process that keeps dying (5 times in 60 s) is given up and
  reported in :attr:`LocalCluster.failed`.
* **No orphans.** Each child runs in its own session (``start_new_session``), so a terminal's
  Ctrl-C reaches only the launcher, which stops the front end first (it drains), then the
  workers: SIGTERM, then SIGKILL to the whole process group after a grace period, then reaping.
  If the launcher itself dies, even by SIGKILL, the children still go: each runs under a small
  bootstrap that holds a pipe from the launcher on stdin and sends itself SIGTERM when the pipe
  reaches end-of-file, which the kernel guarantees when the launcher exits for any reason.
  Unlike ``PR_SET_PDEATHSIG`` this is portable and does not depend on which launcher thread
  started the child.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import runpy
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import collage_inference
from collage_inference.config import ServeConfig, SlowdownSettings, load_config
from collage_inference.errors import CollageError, ConfigError, UnavailableError, WorkerError
from collage_inference.serving.http import load_token
from collage_inference.serving.modes import MODES, REISSUE_TARGETS
from collage_inference.serving.server import READY_PREFIX

if TYPE_CHECKING:
    from collage_inference.serving.ray.launcher import RayCluster

WORKER_MODULE = "collage_inference.serving.worker"
FRONTEND_MODULE = "collage_inference.serving.api"
GRACE_S = 5.0
MAX_RESTARTS, RESTART_WINDOW_S = 5, 60.0
LOG_LINES = 200

_CHILD = "import collage_inference.serving.cluster as c; c.run_child()"


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

    ``port`` is 0 until the first ready line; restarts reuse it so the URL never changes.
    """

    def __init__(
        self,
        name: str,
        module: str,
        args: list[str],
        port: int = 0,
        log_dir: Path | None = None,
        echo: Callable[[str], None] | None = None,
        model: Path | None = None,
        note: str = "",
    ) -> None:
        self.name, self.module, self.args, self.port = name, module, list(args), port
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

    def start(self) -> None:
        """Spawn the child; returns at once (see :func:`wait_all_ready`)."""
        old = self.proc
        if old is not None and old.poll() is not None and old.stdin and not old.stdin.closed:
            old.stdin.close()  # a restart: release the dead one's pipe
        cmd = [sys.executable, "-c", _CHILD, self.module, *self.args, "--port", str(self.port)]
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


class LocalCluster:
    """Workers and front end of one config, started, supervised and stopped as a unit."""

    def __init__(
        self,
        config: ServeConfig,
        *,
        log_dir: Path | None = None,
        echo: Callable[[str], None] | None = None,
        poll_interval: float = 0.2,
        stop_event: threading.Event | None = None,
        interpose: Callable[[str, str], str] | None = None,
    ) -> None:
        """``stop_event``: set it (e.g. from a signal handler) to abort a start that is waiting.
        ``interpose(name, url)``: the address the front end should use for local worker ``name``
        serving at ``url`` (a proxy in front of it, say); called once each, before the front end
        starts. A worker that later moves (:meth:`move_worker`) is announced at its own address."""
        self.config = config
        self.mode = MODES[config.mode]
        self.scnn: list[ManagedProcess] = []
        self.collage: list[ManagedProcess] = []
        self.collage_grids: list[int] = []
        self.frontend: ManagedProcess | None = None
        self.failed: str | None = None  # set when a process could not be restarted
        self.events: list[str] = []  # what the supervisor did, for logs and tests
        self._log_dir, self._echo, self._poll = log_dir, echo, poll_interval
        self._interpose = interpose
        self._stopping = threading.Event()
        self._abort = stop_event or threading.Event()
        self._lock = threading.RLock()  # one restart or stop at a time
        self._supervisor: threading.Thread | None = None
        if log_dir:
            log_dir.mkdir(parents=True, exist_ok=True)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> LocalCluster:
        """Start workers (in parallel), then the front end; on any failure stop what started."""
        try:
            if not self.config.remote:
                self._start_workers()
            self.frontend = self._process(
                "frontend", FRONTEND_MODULE, self._frontend_args(), self.config.port
            )
            self.frontend.start()
            wait_all_ready([self.frontend], self.config.ready_timeout, self._aborted)
        except BaseException:
            self.stop()
            raise
        if self.config.restart:
            self._supervisor = threading.Thread(target=self._supervise, name="supervisor", daemon=True)
            self._supervisor.start()
        return self

    def _start_workers(self) -> None:
        cfg, slow = self.config, self.config.slowdown
        scnn_model = cfg.scnn_model()
        collage_models = cfg.collage_models()  # checked before anything starts
        for i in range(cfg.scnn_count):
            self.scnn.append(
                self._worker(f"scnn-{i}", scnn_model, slow if slow.slows("scnn", i) else None, i)
            )
        copies = [(grid, path) for grid, path in sorted(collage_models.items())] * self.mode.collage_workers
        for i, (grid, path) in enumerate(copies):
            slowed = slow if slow.slows("collage", i) else None
            self.collage.append(self._worker(f"collage-{i}", path, slowed, 1000 + i))
            self.collage_grids.append(grid)
        for proc in self.scnn + self.collage:
            proc.start()
        wait_all_ready(self.scnn + self.collage, cfg.ready_timeout, self._aborted)

    def _process(self, name: str, module: str, args: list[str], port: int = 0) -> ManagedProcess:
        return ManagedProcess(name, module, args, port, self._log_dir, self._echo)

    def _worker(
        self, name: str, model: Path, slowdown: SlowdownSettings | None, seed_index: int
    ) -> ManagedProcess:
        proc = self._process(name, WORKER_MODULE, [])
        proc.model = model
        self._set_worker_args(proc, slowdown, seed_index)
        return proc

    def _set_worker_args(
        self, proc: ManagedProcess, slowdown: SlowdownSettings | None, seed_index: int
    ) -> None:
        """Worker flags: the model under its file stem as the V2 name, loopback, threads, straggling."""
        assert proc.model is not None
        extra = slowdown.worker_args(seed_index) if slowdown and slowdown.active else []
        base = ["--model", str(proc.model), "--name", proc.model.stem, "--host", "127.0.0.1"]
        proc.args = [*base, "--threads", str(self.config.threads), *self._token_args(), *extra]
        proc.note = f"straggles: {' '.join(extra)}" if extra else ""

    def _token_args(self) -> list[str]:
        # The path, never the token: arguments are visible to every user in ``ps``.
        return ["--token-file", str(self.config.token_file)] if self.config.token_file else []

    def _frontend_args(self) -> list[str]:
        cfg = self.config
        args = ["--mode", cfg.mode, "--grid", str(cfg.grid), "--policy", cfg.policy, "--host", cfg.host]
        args += self._token_args()
        args += [
            "--request-timeout",
            f"{cfg.request_timeout:g}",
            "--replicate-timeout",
            f"{cfg.replicate_timeout:g}",
        ]
        args += ["--max-pending", str(cfg.max_pending), "--model-name", cfg.model_name]
        args += ["--reissue-to", cfg.reissue_to, "--confident-at", f"{cfg.confident_at:g}"]
        if cfg.group_timeout is not None:
            args += ["--group-timeout", f"{cfg.group_timeout:g}"]
        if cfg.remote:
            scnn = [e.arg for e in cfg.scnn]
            collage = [e.arg for e in cfg.collage] if self.mode.collage else []
        else:
            scnn = [f"{self._address(p)}#{p.model.stem}" for p in self.scnn if p.model]
            collage = [f"{self._address(p)}#{p.model.stem}" for p in self.collage if p.model]
        for value in scnn:
            args += ["--scnn", value]
        for value in collage:
            args += ["--collage", value]
        return args

    def _address(self, proc: ManagedProcess) -> str:
        assert proc.url is not None
        return self._interpose(proc.name, proc.url) if self._interpose else proc.url

    def stop(self, grace: float = GRACE_S) -> None:
        """Stop everything: front end first (it drains), then workers; SIGKILL after ``grace``."""
        self._stopping.set()
        if self._supervisor and self._supervisor is not threading.current_thread():
            self._supervisor.join(timeout=self.config.ready_timeout + 5)
        with self._lock:
            if self.frontend:
                self.frontend.terminate()
                self.frontend.reap(time.monotonic() + grace)
            workers = self.scnn + self.collage
            for proc in workers:
                proc.terminate()
            deadline = time.monotonic() + grace
            for proc in workers:
                proc.reap(deadline)

    def _aborted(self) -> bool:
        return self._stopping.is_set() or self._abort.is_set()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- supervision ------------------------------------------------------------------------------

    def _supervise(self) -> None:
        while not self._stopping.wait(self._poll):
            for proc in self.processes():
                with self._lock:
                    if self._stopping.is_set() or not proc.expected or proc.alive:
                        continue
                    self._restart(proc)

    def _restart(self, proc: ManagedProcess) -> None:
        code = proc.proc.returncode if proc.proc else None
        now = time.monotonic()
        proc.restarts = [t for t in proc.restarts if now - t < RESTART_WINDOW_S]
        if len(proc.restarts) >= MAX_RESTARTS:
            proc.expected = False
            self.failed = f"{proc.name} died {MAX_RESTARTS + 1} times within {RESTART_WINDOW_S:.0f}s; gave up"
            self._note(f"{self.failed}; its last output:\n{proc.log_tail()}")
            return
        self._note(f"{proc.name} exited with code {code}; restarting it on port {proc.port}")
        proc.restarts.append(now)
        proc.start()
        try:
            wait_all_ready([proc], self.config.ready_timeout, self._aborted)
        except WorkerError as exc:
            if proc is self.frontend or "cannot listen" not in str(exc):
                self._note(f"restart of {proc.name} failed: {exc}")
                time.sleep(min(0.2 * 2 ** len(proc.restarts), 5.0))  # then the next poll retries
                return
            self._note(f"port {proc.port} of {proc.name} is taken; starting it on a free port")
            self._start_elsewhere(proc)
        else:
            self._note(f"{proc.name} is back at {proc.url} (pid {proc.pid})")

    def _start_elsewhere(self, proc: ManagedProcess) -> None:
        """Start worker ``proc`` on a free port and tell the front end its new address."""
        proc.port = 0
        proc.start()
        wait_all_ready([proc], self.config.ready_timeout, self._aborted)
        assert proc.url is not None
        self._tell_frontend(proc.name, proc.url)
        self._note(f"{proc.name} is back at {proc.url} (pid {proc.pid}); the front end knows")

    def _tell_frontend(self, worker_id: str, url: str) -> None:
        token = load_token(self.config.token_file)
        request = urllib.request.Request(
            f"{self.url}/admin/workers/{worker_id}",
            data=json.dumps({"url": url}).encode(),
            method="PUT",
            headers={
                "Content-Type": "application/json",
                **({"Authorization": f"Bearer {token}"} if token else {}),
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=5.0) as response:
                response.read()
        except OSError as exc:
            raise WorkerError(f"could not tell the front end that {worker_id} moved to {url}: {exc}") from exc

    def _note(self, message: str) -> None:
        self.events.append(message)
        if self._echo:
            self._echo(f"[launcher] {message}")

    # -- for tests and the benchmark harness ----------------------------------------------------

    def processes(self) -> list[ManagedProcess]:
        return [*self.scnn, *self.collage, *([self.frontend] if self.frontend else [])]

    @property
    def url(self) -> str:
        """The front end's base URL."""
        if self.frontend is None or not self.frontend.url:
            raise UnavailableError("the cluster is not started; call start() or use it in a with block")
        return self.frontend.url

    @property
    def worker_urls(self) -> list[str]:
        """The s-CNN workers' base URLs, index i being the front end's ``scnn-i``."""
        if self.config.remote:
            return [e.url for e in self.config.scnn]
        return [p.url or "" for p in self.scnn]

    @property
    def collage_urls(self) -> list[str]:
        if self.config.remote:
            return [e.url for e in self.config.collage]
        return [p.url or "" for p in self.collage]

    @property
    def extra_cost(self) -> float:
        """Worker processes beyond the k of mode ``none``, as a share of k."""
        collage = len(self.config.collage) if self.config.remote else len(self.collage)
        return self.mode.extra_cost(self.config.k, collage)

    def process_tree(self) -> set[int]:
        """Every live process the cluster started, their children (e.g. CPU burners) included:
        take it before :meth:`stop` and check none is :func:`running` after."""
        return {pid for p in self.processes() if p.pid and p.alive for pid in process_tree(p.pid)}

    def pids(self) -> list[int]:
        """Every pid any child ever had (restarts included), for orphan checks."""
        return [pid for p in self.processes() for pid in p.pids]

    def kill_worker(self, index: int, sig: int = signal.SIGKILL) -> int:
        """Kill s-CNN worker ``index`` (its process group) as a crash would; returns the old pid.
        The supervisor restarts it on the same port (see :meth:`wait_restarted`)."""
        proc = self.scnn[index]
        pid = proc.pid
        assert pid is not None
        proc.signal(sig, group=True)
        return pid

    def wait_restarted(self, index: int, old_pid: int, timeout: float = 30.0) -> None:
        """Block until s-CNN worker ``index`` runs again under a new pid and is ready."""
        proc, deadline = self.scnn[index], time.monotonic() + timeout
        while not (proc.pid != old_pid and proc.ready):
            if time.monotonic() > deadline:
                raise WorkerError(f"{proc.name} was not restarted within {timeout:.0f}s: {self.events[-3:]}")
            time.sleep(0.05)

    def move_worker(self, index: int) -> str:
        """Restart s-CNN worker ``index`` on a new port, as a rescheduled worker would come back,
        and tell the front end; returns its new URL."""
        proc = self.scnn[index]
        with self._lock:
            proc.terminate()
            proc.reap(time.monotonic() + GRACE_S)
            self._start_elsewhere(proc)
        assert proc.url is not None
        return proc.url

    def restart_worker(self, index: int, slowdown: SlowdownSettings | None = None) -> None:
        """Restart s-CNN worker ``index`` on its port, straggling as ``slowdown`` says (None: not)."""
        proc = self.scnn[index]
        with self._lock:
            proc.terminate()
            proc.reap(time.monotonic() + GRACE_S)
            self._set_worker_args(proc, slowdown, index)
            proc.start()
            wait_all_ready([proc], self.config.ready_timeout, self._aborted)

    def describe(self) -> str:
        """What runs where, and what the redundancy costs."""
        cfg = self.config
        grids = ", ".join(f"{s}x{s}" for s in self.collage_grids) or ("remote" if self.mode.collage else "-")
        lines = [
            f"mode {cfg.mode}, grid {cfg.grid} (k = {cfg.k}): {cfg.scnn_count} s-CNN worker(s), "
            f"collage {grids}; extra cost of the mode: {self.extra_cost:.3f} x the k workers of mode none"
            + (
                "" if cfg.scnn_count == self.mode.scnn_workers(cfg.k) else " (this run sizes its pool itself)"
            ),
            f"  front end  {self.url}  (POST /v2/models/{cfg.model_name}/infer, POST /predict, "
            "GET /v2/health/ready, GET /metrics)",
        ]
        if cfg.remote:
            lines += [f"  scnn-{i:<5} {e.url}  model {e.model} (remote)" for i, e in enumerate(cfg.scnn)]
            lines += [
                f"  collage-{i:<2} {e.url}  model {e.model} (remote)" for i, e in enumerate(cfg.collage)
            ]
        for proc in self.scnn + self.collage:
            model = proc.model.name if proc.model else "?"
            lines.append(f"  {proc.name:<10} {proc.url}  {model}  {proc.note}".rstrip())
        return "\n".join(lines)


# --- collage serve ---------------------------------------------------------------------------------


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """``collage serve`` flags; every one defaults to None so the config file (or default) holds."""
    p = parser or argparse.ArgumentParser(prog="collage serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, help="a TOML config (examples/local.toml, examples/cluster.toml)")
    p.add_argument("--mode", choices=tuple(MODES), help="redundancy strategy (default collage)")
    p.add_argument("--grid", help="collage side S (k = S*S), or 'auto' (default 3)")
    p.add_argument(
        "--policy", choices=("confident", "patient", "first"), help="decoder policy (default confident)"
    )
    p.add_argument(
        "--confident-at", type=float, help="policy confident: the cell confidence that answers at once"
    )
    p.add_argument("--group-timeout", type=float, help="group deadline, seconds (default adaptive)")
    p.add_argument("--request-timeout", type=float, help="end-to-end deadline, seconds (default 5)")
    p.add_argument("--replicate-timeout", type=float, help="re-issue timeout of mode replicate (0.1)")
    p.add_argument(
        "--reissue-to",
        choices=REISSUE_TARGETS,
        help="idle (default) or least-loaded: where re-issues for lateness go",
    )
    p.add_argument("--max-pending", type=int, help="requests in flight before 429 (4096)")
    p.add_argument("--model-name", help="model name in the front end's V2 URLs (classifier)")
    p.add_argument("--host", help="front end address (127.0.0.1)")
    p.add_argument("--port", type=int, help="front end port; 0 picks a free one (8000)")
    p.add_argument("--ready-timeout", type=float, help="seconds to wait for each process (60)")
    p.add_argument(
        "--token-file", type=Path, help="file holding the shared bearer token (default: $COLLAGE_TOKEN)"
    )
    p.add_argument("--no-restart", dest="restart", action="store_false", default=None,
                   help="do not restart local processes that die")  # fmt: skip
    p.add_argument("--backend", choices=("local", "ray"),
                   help="local: processes on this machine (default); ray: Ray Serve deployments")  # fmt: skip
    p.add_argument("--address", help="backend ray: local (a private Ray, default), auto, ray://HOST:10001")
    local = p.add_argument_group("local workers")
    local.add_argument("--models-dir", type=Path, help="folder of scnn.onnx and collage-SxS.onnx")
    local.add_argument("--threads", type=int, help="engine threads per worker (1)")
    local.add_argument("--scnn-workers", type=int, help="s-CNN workers (default: what the mode needs)")
    local.add_argument(
        "--slowdown", help="delay sampler: none, bimodal[:SCALE], trace:PATH[:SCALE], pareto:..."
    )
    local.add_argument("--slowdown-kind", choices=("per-request", "per-instance"))
    local.add_argument("--seed", type=int, help="seed of worker 0's delays (worker i: seed + i)")
    local.add_argument("--slow-workers", help="comma-separated s-CNN worker indexes that straggle (all)")
    local.add_argument(
        "--slow-collage", action="store_true", default=None, help="collage workers straggle too"
    )
    local.add_argument("--contention", type=float, help="CPU fraction burnt beside each slow worker")
    local.add_argument("--slow-onset-rate", type=float, help="per-instance: slow periods per second")
    local.add_argument("--slow-period", type=float, help="per-instance: mean slow period, seconds")
    remote = p.add_argument_group("remote workers (then only the front end starts)")
    remote.add_argument("--scnn", action="append", metavar="URL#MODEL", help="an s-CNN V2 server (repeat)")
    remote.add_argument(
        "--collage", action="append", metavar="URL#MODEL", help="a collage V2 server (repeat)"
    )
    out = p.add_argument_group("output")
    out.add_argument("--log-dir", type=Path, help="also write each process's output to DIR/NAME.log")
    out.add_argument("--verbose", action="store_true", help="echo every process's output to stderr")
    return p


def overrides_from_args(args: argparse.Namespace) -> dict[str, object]:
    """Flag values as config keys (None: not given)."""
    slow_workers = None
    if args.slow_workers is not None:
        try:
            slow_workers = [int(i) for i in args.slow_workers.split(",") if i.strip()]
        except ValueError:
            raise ConfigError(f"--slow-workers takes indexes like 0,2; got {args.slow_workers!r}") from None
    keys = ("mode", "grid", "policy", "group_timeout", "request_timeout", "replicate_timeout", "reissue_to",
            "confident_at", "max_pending", "model_name", "host", "port", "ready_timeout", "restart",
            "token_file", "models_dir", "threads", "scnn_workers", "scnn", "collage")  # fmt: skip
    overrides: dict[str, object] = {k: getattr(args, k) for k in keys}
    overrides.update(
        {
            "slowdown.spec": args.slowdown,
            "slowdown.kind": args.slowdown_kind,
            "slowdown.seed": args.seed,
            "slowdown.workers": slow_workers,
            "slowdown.collage": args.slow_collage,
            "slowdown.contention": args.contention,
            "slowdown.onset_rate": args.slow_onset_rate,
            "slowdown.period": args.slow_period,
            "backend": args.backend,
            "ray.address": args.address,
        }
    )
    return overrides


def open_cluster(config: ServeConfig, **kwargs: Any) -> LocalCluster | RayCluster:
    """The launcher of ``config.backend``, not started: a LocalCluster (``kwargs`` are its
    options), or a RayCluster (Ray is imported only then; ``stop_event`` and ``echo`` apply)."""
    if config.backend == "ray":
        from collage_inference.serving.ray.launcher import RayCluster

        return RayCluster(config, stop_event=kwargs.get("stop_event"), log_to_driver=bool(kwargs.get("echo")))
    return LocalCluster(config, **kwargs)


def main(argv: list[str] | None = None) -> int:
    """``collage serve``: start the deployment, print where it runs, stop it on Ctrl-C/SIGTERM.

    Exit codes: 0 after a requested stop, 1 when a process could not be kept running, 2 for a
    bad config or a process that failed to start.
    """
    args = build_parser().parse_args(argv)
    stop = threading.Event()
    echo = (lambda line: print(line, file=sys.stderr, flush=True)) if args.verbose else None
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    cluster: LocalCluster | RayCluster | None = None
    try:
        config = load_config(args.config, overrides_from_args(args))
        cluster = open_cluster(config, log_dir=args.log_dir, echo=echo, stop_event=stop)
        cluster.start()
        print(cluster.describe(), flush=True)
        print("serving; Ctrl-C or SIGTERM stops everything", flush=True)
        while not stop.wait(0.5):
            if cluster.failed:
                print(f"collage serve: error: {cluster.failed}", file=sys.stderr)
                return 1
        print("stopping ...", file=sys.stderr, flush=True)
        return 0
    except CollageError as exc:
        if stop.is_set():
            return 0
        print(f"collage serve: error: {exc}", file=sys.stderr)
        return 2
    finally:
        for sig in previous:  # a second Ctrl-C must not interrupt the clean-up
            signal.signal(sig, signal.SIG_IGN)
        if cluster is not None:
            cluster.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
