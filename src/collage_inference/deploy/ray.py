"""`collage serve --backend ray`: a ServeConfig as a Ray Serve application.

    with RayCluster(load_config("examples/ray.toml", {"port": 0})) as cluster:
        cluster.url      # the Serve HTTP proxy: V2, /predict, /metrics as with the local backend

:func:`build_app` turns the config into three kinds of deployments: ``scnn`` (the s-CNN, with
its replica count or autoscaling bounds), ``collage-SxS`` (one per served grid) and ``frontend``
(the ingress, which the HTTP proxy routes every path to). :class:`RayCluster` has the
:class:`~collage_inference.deploy.local.LocalCluster` interface the CLI and the benchmark
harness use: ``start``, ``stop``, ``url``, ``describe``, ``extra_cost``.

Both launchers hand their children the same objects: each model deployment is bound with a
:class:`~collage_inference.config.WorkerSettings` (as a local worker process reads from its
settings file) and the deployment's :class:`~collage_inference.config.SlowdownSettings` (each
replica picks its own straggling by its rank), and the ingress with the
:class:`~collage_inference.config.ServeConfig` itself, as the local front end.

With ``[ray] address = "local"`` (the default) it starts a private Ray instance on this machine
and stops it, every process included, on :meth:`RayCluster.stop`; with ``auto`` or
``ray://HOST:10001`` it deploys onto a running cluster and on stop deletes only its own
application. The model files are read by the replicas, so on a multi-node cluster
``models_dir`` must name a path that exists on every node (see docs/ray.md).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

from collage_inference.config import ServeConfig, WorkerSettings, load_config
from collage_inference.errors import ConfigError, UnavailableError
from collage_inference.modes import MODES
from collage_inference.serving.web.routes import load_token

INSTALL_HINT = "pip install 'collage-inference[ray]'"


def require_ray() -> ModuleType:
    """The ``ray`` module with Serve, or a ConfigError that says how to install it."""
    try:
        import ray
        from ray import serve  # noqa: F401  (Serve has extra dependencies of its own)
    except ImportError as exc:
        raise ConfigError(
            f"the Ray backend needs Ray Serve, which is not installed ({exc}); run: {INSTALL_HINT}"
        ) from exc
    return ray


def replica_settings(config: ServeConfig, model: Path) -> WorkerSettings:
    """A model deployment's settings: ``model`` (resolved, as replicas may start in another
    directory) under its file stem, with the config's engine threads. Host and port are the
    Serve proxy's; straggling is chosen per replica from the deployment's SlowdownSettings."""
    return WorkerSettings(model_path=model.resolve(), name=model.stem, threads=config.threads)


def _scaling(config: ServeConfig, replicas: int, cpus: float, autoscale: bool = False) -> dict[str, Any]:
    rs = config.ray
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cpus},
        "max_ongoing_requests": rs.max_ongoing_requests,
    }
    if autoscale and rs.autoscaling:
        options["autoscaling_config"] = {
            "min_replicas": rs.min_replicas,
            "max_replicas": rs.max_replicas,
            "target_ongoing_requests": rs.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = replicas
    return options


def build_app(config: ServeConfig) -> Any:
    """The Serve application of ``config``: model deployments bound into the ingress."""
    require_ray()
    from ray import serve

    from collage_inference.serving.ray.deployments import ModelDeployment
    from collage_inference.serving.ray.ingress import Ingress

    rs, slow = config.ray, config.slowdown  # each replica applies slow.for_worker(kind, its rank)
    model = serve.deployment(ModelDeployment)
    scnn = model.options(name="scnn", **_scaling(config, config.scnn_count, rs.scnn_cpus, True)).bind(
        replica_settings(config, config.scnn_model()), slow
    )
    collage = {
        grid: model.options(
            name=f"collage-{grid}x{grid}", **_scaling(config, collage_replicas(config), rs.collage_cpus)
        ).bind(replica_settings(config, path), slow)
        for grid, path in sorted(config.collage_models().items())
    }
    ingress = serve.deployment(Ingress).options(
        name="frontend",
        num_replicas=rs.ingress_replicas,
        ray_actor_options={"num_cpus": rs.ingress_cpus},
        max_ongoing_requests=config.max_pending,  # the front end sheds load itself (429)
    )
    token = load_token(config.token_file)
    return ingress.bind(scnn, collage, config, token)


def app_builder(args: dict[str, Any]) -> Any:
    """The application for Ray's own tooling (``serve run``, ``serve deploy``, a KubeRay
    RayService): ``args`` holds ``config`` (a TOML file on the cluster) and any config keys to
    override, e.g. ``serve run collage_inference.deploy.ray:app_builder
    config=examples/ray.toml mode=hedge``. The HTTP host, port and Ray address are then Ray's."""
    overrides = {k: v for k, v in args.items() if k != "config"}
    return build_app(load_config(args.get("config"), {**overrides, "backend": "ray"}))


def collage_replicas(config: ServeConfig) -> int:
    """Replicas per collage grid: the config's, times the mode's collage workers (collage-2: 2)."""
    return config.ray.collage_replicas * MODES[config.mode].collage_workers


def requested_cpus(config: ServeConfig) -> float:
    """Logical CPUs the deployments reserve (the s-CNN at its largest under autoscaling)."""
    rs = config.ray
    scnn = rs.max_replicas if rs.autoscaling else config.scnn_count
    collage = len(config.collage_models()) * collage_replicas(config)
    return scnn * rs.scnn_cpus + collage * rs.collage_cpus + rs.ingress_replicas * rs.ingress_cpus


def local_cpus(config: ServeConfig) -> int:
    """The logical CPUs of a private Ray instance: ``[ray] num_cpus``, or as many as the
    deployments reserve (at least the machine's cores). Declaring more than there are is what
    the local backend does too (k worker processes on any number of cores); a replica that
    cannot be placed would otherwise wait for ever."""
    rs, wanted = config.ray, requested_cpus(config)
    if rs.num_cpus is None:
        return max(os.cpu_count() or 1, math.ceil(wanted))
    if wanted > rs.num_cpus + 1e-9:
        raise ConfigError(
            f"the deployments reserve {wanted:g} CPUs but [ray] num_cpus is {rs.num_cpus:g}: lower "
            "scnn_cpus / collage_cpus / ingress_cpus or the replica counts, or raise num_cpus"
        )
    return math.ceil(rs.num_cpus)


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _keep_signal_handlers() -> Iterator[None]:
    """Restore this process's SIGINT/SIGTERM handlers after the block: ``ray.init`` installs
    its own fatal-signal handler, which aborts the driver on SIGTERM (no clean stop, and the
    Ray processes it started are orphaned)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)


class RayCluster:
    """One config's Serve application, started and stopped as a unit (see the module doc).

    ``ray_init``: extra ``ray.init`` arguments, e.g. ``_temp_dir`` or ``object_store_memory``
    for tests; ``log_to_driver``: show the replicas' output here.
    """

    def __init__(
        self,
        config: ServeConfig,
        *,
        stop_event: threading.Event | None = None,
        log_to_driver: bool = False,
        ray_init: dict[str, Any] | None = None,
    ) -> None:
        self.config = config if config.backend == "ray" else replace(config, backend="ray")
        self.mode = MODES[config.mode]
        self.failed: str | None = None  # Serve restarts replicas itself; nothing to report here
        self._abort = stop_event or threading.Event()
        self._log_to_driver = log_to_driver
        self._ray_init = ray_init or {}
        self._connected = False  # this object called ray.init (and so calls ray.shutdown)
        self._deployed = False
        self._url: str | None = None

    def start(self) -> RayCluster:
        """Connect to (or start) Ray, deploy the application, wait until it answers ready."""
        ray = require_ray()
        from ray import serve

        try:
            app = build_app(self.config)  # checks the model files before anything starts
            rs = self.config.ray
            if not ray.is_initialized():
                kwargs: dict[str, Any] = {
                    "address": rs.address,
                    "log_to_driver": self._log_to_driver,
                    "configure_logging": self._log_to_driver,
                }
                if rs.owns_cluster:
                    kwargs |= {"include_dashboard": False, "num_cpus": local_cpus(self.config)}
                    if rs.object_store_mb:
                        kwargs["object_store_memory"] = rs.object_store_mb * 2**20
                self._connected = True  # before init: stop() also cleans up a half-started Ray
                try:
                    with _keep_signal_handlers():
                        ray.init(**(kwargs | self._ray_init))
                except (ConnectionError, RuntimeError, ValueError) as exc:  # no cluster there, bad address
                    raise UnavailableError(f"cannot start or reach Ray at {rs.address!r}: {exc}") from exc
            host = self.config.host
            port = self.config.port or free_port(host)
            serve.start(http_options={"host": host, "port": port})
            self._deployed = True
            # Not serve.run: it blocks until the application runs, with no time limit and deaf
            # to Ctrl-C/SIGTERM (a replica that cannot be placed waits for ever). _wait_ready
            # polls instead, within ready_timeout and while no stop is requested.
            serve.run_many(
                [serve.RunTarget(app, name=rs.app_name, route_prefix="/")],
                wait_for_ingress_deployment_creation=False,
                wait_for_applications_running=False,
            )
            shown = f"[{host}]" if ":" in host else host
            self._url = f"http://{shown}:{port}"
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _deploy_failure(self) -> str | None:
        """Serve's message when the application failed to deploy (a replica's constructor
        raised, e.g. a model file missing on a node); None while it deploys or runs."""
        from ray import serve

        with contextlib.suppress(Exception):  # a status that cannot be read now is asked again
            status = serve.status().applications.get(self.config.ray.app_name)
            if status is not None and status.status == "DEPLOY_FAILED":  # a str enum
                return status.message or "no message"
        return None

    def _wait_ready(self) -> None:
        """Wait until the application runs and the proxy routes to it: Serve reports the
        deployments healthy before its proxy does, so the proxy is asked."""
        deadline = time.monotonic() + self.config.ready_timeout
        while not self._abort.is_set():
            failure = self._deploy_failure()
            if failure is not None:
                raise UnavailableError(f"the Ray Serve application failed to deploy: {failure}")
            with (
                contextlib.suppress(OSError, ValueError),  # refused, 503 (an HTTPError), half-started
                urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=2.0) as resp,
            ):
                if json.load(resp).get("ready"):
                    return
            if time.monotonic() > deadline:
                raise UnavailableError(
                    f"the Ray Serve application was not ready at {self.url} within "
                    f"{self.config.ready_timeout:.0f}s (raise ready_timeout on a busy machine)"
                )
            time.sleep(0.2)
        raise UnavailableError("stopped while starting")

    def stop(self) -> None:
        """Delete the application; stop Serve and Ray too when this object started them."""
        ray = require_ray()
        from ray import serve

        with contextlib.suppress(Exception):
            if self._deployed and ray.is_initialized():
                if self.config.ray.owns_cluster:
                    serve.shutdown()  # the controller and proxies stop with their replicas
                else:
                    serve.delete(self.config.ray.app_name)
        self._deployed = False
        if self._connected:
            ray.shutdown()  # a private instance stops every process; a remote one is left
            self._connected = False

    def __enter__(self) -> RayCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The Serve HTTP proxy's base URL."""
        if self._url is None:
            raise UnavailableError("the Ray application is not started; call start() or use a with block")
        return self._url

    @property
    def extra_cost(self) -> float:
        """Replicas beyond the k of mode ``none``, as a share of k (as the local backend counts)."""
        return self.mode.extra_cost(self.config.k, collage_replicas(self.config))

    def describe(self) -> str:
        """What runs where, and what the redundancy costs."""
        cfg, rs = self.config, self.config.ray
        scaling = (
            f"autoscaling {rs.min_replicas}..{rs.max_replicas} replicas "
            f"(target {rs.target_ongoing_requests:g} ongoing)"
            if rs.autoscaling
            else None
        )
        grids = sorted(cfg.collage_models())
        slow = cfg.slowdown
        ranks = list(slow.workers) if slow.workers is not None else "all"
        note = f", straggling: {slow.describe()} on ranks {ranks}" if slow.active else ""
        lines = [
            f"mode {cfg.mode}, grid {cfg.grid} (k = {cfg.k}) on Ray Serve ({rs.address}), "
            f"application {rs.app_name!r}; extra cost of the mode: {self.extra_cost:.3f}",
            f"  front end  {self.url}  (POST /v2/models/{cfg.model_name}/infer, POST /predict, "
            "GET /v2/health/ready, GET /metrics)",
            f"  scnn       {scaling or f'{cfg.scnn_count} replicas'} x {rs.scnn_cpus:g} CPU, "
            f"{cfg.threads} thread(s){note}",
        ]
        lines += [
            f"  collage-{g}x{g} {collage_replicas(cfg)} replica(s) x {rs.collage_cpus:g} CPU" for g in grids
        ]
        lines.append(f"  frontend   {rs.ingress_replicas} replica(s) x {rs.ingress_cpus:g} CPU")
        return "\n".join(lines)
