"""The local launcher: a whole collage-inference deployment on one machine, in real processes.

    collage serve --mode collage --grid 3          # 9 s-CNN workers, 1 collage worker, front end
    collage serve --config examples/cluster.toml   # only the front end, over remote V2 servers

:class:`LocalCluster` starts the s-CNN workers (``mode.scnn_workers(k)`` of them), the collage
worker(s) (one per served grid) and the front end as separate processes on loopback, and is the
Python API the tests and the benchmark harness use::

    with LocalCluster(load_config(overrides={"port": 0})) as cluster:
        cluster.url, cluster.worker_urls, cluster.kill_worker(0)

Why it is built this way:

* **Config once.** Each child is given one settings file, never a flag list: a worker its
  :func:`worker_settings`, the front end this very ServeConfig with its workers' addresses
  (:func:`config_for_frontend`). The files live in a private folder made at start and removed
  at stop, and are rewritten before every (re)start with the port the child must use.
* **Ports.** Workers bind port 0 and the launcher reads their ``ready on URL`` line, so parallel
  clusters never collide. All workers start at once (import and model load overlap) and the
  front end starts once they are ready, with their URLs in its config.
* **Supervision.** A thread polls the children; one that dies is restarted *on the same port*,
  so the front end keeps its URL and its readiness probe brings the worker back without any
  reconfiguration. If that port has been taken meanwhile, the worker exits with
  :attr:`ListenError.exit_code <collage_inference.errors.ListenError>`; the launcher then starts
  it on a free port and tells the front end its new address (``PUT /admin/workers/{id}``). A
  process that keeps dying (5 times in 60 s) is given up and reported in
  :attr:`LocalCluster.failed`.
* **No orphans.** A terminal's Ctrl-C reaches only the launcher (each child has its own
  session), which stops the front end first (it drains), then the workers: SIGTERM, SIGKILL to
  the process group after a grace period, reaping. If the launcher dies, even by SIGKILL, the
  children see their launcher pipe close and stop (:mod:`collage_inference.deploy.process`).
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from collage_inference.config import (
    ServeConfig,
    SlowdownSettings,
    WorkerEndpoint,
    WorkerSettings,
    add_frontend_arguments,
    add_slowdown_arguments,
    dump_config,
    frontend_overrides,
    load_config,
    slowdown_overrides,
)
from collage_inference.deploy.process import ManagedProcess, process_tree, wait_all_ready
from collage_inference.errors import CollageError, ConfigError, ListenError, UnavailableError, WorkerError
from collage_inference.modes import MODES
from collage_inference.serving.web.routes import load_token

if TYPE_CHECKING:
    from collage_inference.deploy.ray import RayCluster

WORKER_MODULE = "collage_inference.serving.worker"
FRONTEND_MODULE = "collage_inference.serving.api"
GRACE_S = 5.0
MAX_RESTARTS, RESTART_WINDOW_S = 5, 60.0


def worker_settings(config: ServeConfig, model: Path, kind: str, index: int) -> WorkerSettings:
    """Local worker ``index`` of ``kind`` (scnn or collage): ``model`` under its file stem on
    loopback, straggling as ``config`` says for it. The port is set at each start."""
    return WorkerSettings(
        model_path=model, name=model.stem, host="127.0.0.1", port=0, threads=config.threads,
        slowdown=config.slowdown.for_worker(kind, index), token_file=config.token_file,
    )  # fmt: skip


def config_for_frontend(
    config: ServeConfig, scnn: Sequence[WorkerEndpoint], collage: Sequence[WorkerEndpoint], port: int
) -> ServeConfig:
    """What the front end process is given: ``config`` with these workers, listening on ``port``."""
    return replace(config, backend="local", scnn=tuple(scnn), collage=tuple(collage), port=port)


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
        self.log_dir, self.echo, self._poll = log_dir, echo, poll_interval
        self.stop_event = stop_event or threading.Event()
        self.interpose = interpose
        self._settings: dict[str, WorkerSettings] = {}  # each local worker's, by process name
        self._endpoints: dict[str, WorkerEndpoint] = {}  # the front end's address of each
        self._settings_dir: Path | None = None
        self._stopping = threading.Event()
        self._lock = threading.RLock()  # one restart or stop at a time
        self._supervisor: threading.Thread | None = None
        if log_dir:
            log_dir.mkdir(parents=True, exist_ok=True)

    # -- lifecycle ------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Everything but spawning: check the model files, make the private settings folder and
        the (unstarted) processes. :meth:`start` calls it; :meth:`stop` removes the folder."""
        if self.frontend is not None:
            return
        cfg = self.config
        if not cfg.remote:
            scnn_model, collage_models = cfg.scnn_model(), cfg.collage_models()  # before anything
            self.scnn = [self._worker("scnn", i, scnn_model) for i in range(cfg.scnn_count)]
            copies = sorted(collage_models.items()) * self.mode.collage_workers
            self.collage = [self._worker("collage", i, path) for i, (_, path) in enumerate(copies)]
            self.collage_grids = [grid for grid, _ in copies]
        self._settings_dir = Path(tempfile.mkdtemp(prefix="collage-serve-"))
        self.frontend = ManagedProcess(
            "frontend", FRONTEND_MODULE, self._write_frontend, cfg.port, self.log_dir, self.echo
        )

    def start(self) -> LocalCluster:
        """Start workers (in parallel), then the front end; on any failure stop what started."""
        try:
            self.prepare()
            workers = self.scnn + self.collage
            for proc in workers:
                proc.start()
            wait_all_ready(workers, self.config.ready_timeout, self._aborted)
            assert self.frontend is not None
            self.frontend.start()
            wait_all_ready([self.frontend], self.config.ready_timeout, self._aborted)
        except BaseException:
            self.stop()
            raise
        if self.config.restart:
            self._supervisor = threading.Thread(target=self._supervise, name="supervisor", daemon=True)
            self._supervisor.start()
        return self

    def _worker(self, kind: str, index: int, model: Path) -> ManagedProcess:
        name = f"{kind}-{index}"
        self._settings[name] = settings = worker_settings(self.config, model, kind, index)
        write = functools.partial(self._write_worker, name)
        return ManagedProcess(
            name, WORKER_MODULE, write, 0, self.log_dir, self.echo, model, _straggling(settings)
        )

    def _settings_file(self, name: str) -> Path:
        if self._settings_dir is None:
            raise UnavailableError("the cluster is stopped; start it again to restart a process")
        return self._settings_dir / f"{name}.json"

    def _write_worker(self, name: str, port: int) -> Path:
        return replace(self._settings[name], port=port).dump(self._settings_file(name))

    def _write_frontend(self, port: int) -> Path:
        """The front end's config; its workers' addresses are learnt (and interposed) once."""
        cfg = self.config
        if cfg.remote:
            scnn, collage = cfg.scnn, cfg.collage if self.mode.collage else ()
        else:
            if not self._endpoints:
                for proc in self.scnn + self.collage:
                    assert proc.url is not None and proc.model is not None, f"{proc.name} is not ready"
                    url = self.interpose(proc.name, proc.url) if self.interpose else proc.url
                    self._endpoints[proc.name] = WorkerEndpoint(url, proc.model.stem)
            scnn = tuple(self._endpoints[p.name] for p in self.scnn)
            collage = tuple(self._endpoints[p.name] for p in self.collage)
        return dump_config(config_for_frontend(cfg, scnn, collage, port), self._settings_file("frontend"))

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
            if self._settings_dir is not None:
                shutil.rmtree(self._settings_dir, ignore_errors=True)
                self._settings_dir = None

    def _aborted(self) -> bool:
        return self._stopping.is_set() or self.stop_event.is_set()

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
        """Restart a dead process on its port; a worker whose port is taken, on a free one."""
        now = time.monotonic()
        proc.restarts = [t for t in proc.restarts if now - t < RESTART_WINDOW_S]
        if len(proc.restarts) >= MAX_RESTARTS:
            proc.expected = False
            self.failed = f"{proc.name} died {MAX_RESTARTS + 1} times within {RESTART_WINDOW_S:.0f}s; gave up"
            self._note(f"{self.failed}; its last output:\n{proc.log_tail()}")
            return
        self._note(f"{proc.name} exited with code {proc.exit_code}; restarting it on port {proc.port}")
        proc.restarts.append(now)
        try:
            proc.start()
            wait_all_ready([proc], self.config.ready_timeout, self._aborted)
            self._note(f"{proc.name} is back at {proc.url} (pid {proc.pid})")
        except (WorkerError, UnavailableError, OSError) as exc:
            if proc is self.frontend or proc.exit_code != ListenError.exit_code:
                self._note(f"restart of {proc.name} failed: {exc}")
                time.sleep(min(0.2 * 2 ** len(proc.restarts), 5.0))  # then the next poll retries
                return
            self._note(
                f"port {proc.port} of {proc.name} is taken (exit code {proc.exit_code}); "
                "starting it on a free port"
            )
            try:
                self._start_elsewhere(proc)
            except WorkerError as again:  # the next poll retries if it died
                self._note(f"restart of {proc.name} on a free port failed: {again}")

    def _start_elsewhere(self, proc: ManagedProcess) -> None:
        """Start worker ``proc`` on a free port and tell the front end its new address."""
        proc.port = 0
        proc.start()
        wait_all_ready([proc], self.config.ready_timeout, self._aborted)
        assert proc.url is not None and proc.model is not None
        self._endpoints[proc.name] = WorkerEndpoint(proc.url, proc.model.stem)  # for front-end restarts
        self._tell_frontend(proc.name, proc.url)
        self._note(f"{proc.name} is back at {proc.url} (pid {proc.pid}); the front end knows")

    def _tell_frontend(self, worker_id: str, url: str) -> None:
        token = load_token(self.config.token_file)
        request = urllib.request.Request(
            f"{self.url}/admin/workers/{worker_id}",
            data=json.dumps({"url": url}).encode(),
            method="PUT",
            headers={"Content-Type": "application/json"}
            | ({"Authorization": f"Bearer {token}"} if token else {}),
        )
        try:
            with urllib.request.urlopen(request, timeout=5.0) as response:
                response.read()
        except OSError as exc:
            raise WorkerError(f"could not tell the front end that {worker_id} moved to {url}: {exc}") from exc

    def _note(self, message: str) -> None:
        self.events.append(message)
        if self.echo:
            self.echo(f"[launcher] {message}")

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
        return [e.url for e in self.config.scnn] if self.config.remote else [p.url or "" for p in self.scnn]

    @property
    def collage_urls(self) -> list[str]:
        remote = self.config.remote
        return [e.url for e in self.config.collage] if remote else [p.url or "" for p in self.collage]

    @property
    def extra_cost(self) -> float:
        """Worker processes beyond the k of mode ``none``, as a share of k."""
        collage = len(self.config.collage) if self.config.remote else len(self.collage)
        return self.mode.extra_cost(self.config.k, collage)

    def process_tree(self) -> set[int]:
        """Every live process the cluster started, their children (e.g. CPU burners) included:
        take it before :meth:`stop` and check none is running after."""
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
            own = slowdown.for_worker("scnn", index) if slowdown else None
            self._settings[proc.name] = settings = replace(self._settings[proc.name], slowdown=own)
            proc.note = _straggling(settings)
            proc.start()
            wait_all_ready([proc], self.config.ready_timeout, self._aborted)

    def describe(self) -> str:
        """What runs where, and what the redundancy costs."""
        cfg = self.config
        grids = ", ".join(f"{s}x{s}" for s in self.collage_grids) or ("remote" if self.mode.collage else "-")
        backup = f"collage {grids}"
        if self.mode.parity:
            backup = f"parity k = {cfg.parity_k}, {cfg.parity_encoder} code"
        sized = "" if cfg.scnn_count == self.mode.scnn_workers(cfg.k) else " (this run sizes its pool itself)"
        grid = "" if self.mode.parity else f", grid {cfg.grid}"
        lines = [
            f"mode {cfg.mode}{grid} (k = {cfg.k}): {cfg.scnn_count} s-CNN worker(s), "
            f"{backup}; extra cost of the mode: {self.extra_cost:.3f} x the k workers of mode none" + sized,
            f"  front end  {self.url}  (POST /v2/models/{cfg.model_name}/infer, POST /predict, "
            "GET /v2/health/ready, GET /metrics, GET /dashboard)",
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


def _straggling(settings: WorkerSettings) -> str:
    return f"straggles: {settings.slowdown.describe()}" if settings.slowdown else ""


# --- collage serve ---------------------------------------------------------------------------------


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """``collage serve`` flags; every one defaults to None so the config file (or default) holds."""
    p = parser or argparse.ArgumentParser(prog="collage serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, help="a TOML config (examples/local.toml, examples/cluster.toml)")
    add_frontend_arguments(p)  # the front end's flags, shared with `collage frontend`
    p.add_argument("--ready-timeout", type=float, help="seconds to wait for each process (60)")
    p.add_argument("--no-restart", dest="restart", action="store_false", help="do not restart dead processes")
    p.add_argument("--backend", choices=("local", "ray"), help="processes here (local) or Ray Serve")
    p.add_argument("--address", help="backend ray: local (a private Ray, default), auto, ray://HOST:10001")
    local = p.add_argument_group("local workers")
    local.add_argument("--models-dir", type=Path, help="folder of scnn.onnx and collage-SxS.onnx")
    local.add_argument("--threads", type=int, help="engine threads per worker (1)")
    local.add_argument("--scnn-workers", type=int, help="s-CNN workers (default: what the mode needs)")
    add_slowdown_arguments(local)
    local.add_argument("--slow-workers", help="comma-separated s-CNN worker indexes that straggle (all)")
    local.add_argument("--slow-collage", action="store_true", default=None, help="collage workers straggle")
    out = p.add_argument_group("output")
    out.add_argument("--log-dir", type=Path, help="also write each process's output to DIR/NAME.log")
    out.add_argument("--verbose", action="store_true", help="echo every process's output to stderr")
    p.set_defaults(restart=None)
    return p


def overrides_from_args(args: argparse.Namespace) -> dict[str, object]:
    """Flag values as config keys (None: not given)."""
    slow_workers = None
    if args.slow_workers is not None:
        try:
            slow_workers = [int(i) for i in args.slow_workers.split(",") if i.strip()]
        except ValueError:
            raise ConfigError(f"--slow-workers takes indexes like 0,2; got {args.slow_workers!r}") from None
    keys = ("ready_timeout", "restart", "models_dir", "threads", "scnn_workers", "backend")
    overrides: dict[str, object] = {**frontend_overrides(args), **{k: getattr(args, k) for k in keys}}
    overrides.update({f"slowdown.{key}": value for key, value in slowdown_overrides(args).items()})
    overrides.update({"slowdown.workers": slow_workers, "slowdown.collage": args.slow_collage,
                      "ray.address": args.address})  # fmt: skip
    return overrides


def open_cluster(config: ServeConfig, **kwargs: Any) -> LocalCluster | RayCluster:
    """The launcher of ``config.backend``, not started: a LocalCluster (``kwargs`` are its
    options), or a RayCluster (Ray is imported only then; ``stop_event`` and ``echo`` apply)."""
    if config.backend == "ray":
        from collage_inference.deploy.ray import RayCluster

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
