"""The serving config and the local launcher: config errors, a front end over remote workers,
and `collage serve` stopped by Ctrl-C, SIGTERM or its own death without leaving a process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from collage_inference.config import ServeConfig, SlowdownSettings, WorkerEndpoint, load_config
from collage_inference.deploy.local import LocalCluster
from collage_inference.deploy.process import process_tree, running
from collage_inference.errors import ConfigError, ListenError

READY_S = 60.0


def shipped(models_dir: Path) -> tuple[Path, int]:
    """The shipped models folder (or $COLLAGE_TEST_MODELS_DIR) and its smallest collage grid."""
    folder = Path(os.environ.get("COLLAGE_TEST_MODELS_DIR", models_dir))
    grids = [s for s in (2, 3, 4) if (folder / f"collage-{s}x{s}.onnx").is_file()]
    if not (folder / "scnn.onnx").is_file() or not grids:
        pytest.skip(f"the shipped scnn.onnx and a collage-SxS.onnx are not in {folder} yet")
    return folder, grids[0]


def get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def post(url: str, body: bytes, timeout: float = 30.0) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "image/png"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def png_of(image) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[:, :, 0]).save(buf, format="PNG")
    return buf.getvalue()


# --- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("grid = 1", "`grid` (--grid)"),
        ('grid = "big"', "`grid`"),
        ('mode = "fast"', "`mode` (--mode)"),
        ('policy = "eager"', "`policy`"),
        ("confident_at = 1.5", "`confident_at` (--confident-at)"),
        ('reissue_to = "busiest"', "`reissue_to` (--reissue-to)"),
        ("request_timeout = 0", "`request_timeout` (--request-timeout)"),
        ("group_timeout = -1", "`group_timeout`"),
        ('threads = "two"', "`threads`"),
        ("port = 70000", "`port`"),
        ("max_pending = 1.5", "`max_pending`"),
        ("restart = 1", "`restart`"),
        ("gird = 3", "did you mean `grid`"),
        ('[slowdown]\nspec = "pareto:alpha=2"', "`slowdown.spec` (--slowdown)"),
        ('[slowdown]\nkind = "sometimes"', "`slowdown.kind` (--slowdown-kind)"),
        ("[slowdown]\nworkers = [9]", "`slowdown.workers` (--slow-workers)"),
        ("[slowdown]\nworkers = [-1]", "`slowdown.workers`"),
        ("[slowdown]\ncontention = 2.0", "`slowdown.contention` (--contention)"),
        ("[slowdown]\nspeed = 2", "unknown config key `slowdown.speed`"),
        ('slowdown = "bimodal"', "must be a table"),
        ('[[scnn]]\nurl = "http://127.0.0.1:1"', "takes `url` and `model`"),
        ('[[scnn]]\nurl = "ftp://h:1"\nmodel = "scnn"', "must look like http://HOST:PORT"),
        ('[[collage]]\nurl = "http://h:1"\nmodel = "collage-3x3"', "no [[scnn]] workers"),
        ('[[scnn]]\nurl = "http://h:1"\nmodel = "scnn"', "add a [[collage]] table"),
        ("grid = [", "not valid TOML"),
        ('mode = "parm"\nparity_k = 3', "`parity_k` (--parity-k)"),
        ('parity_encoder = "xor"', "`parity_encoder` (--parity-encoder)"),
    ],
)
def test_bad_config_values_name_the_key_and_the_fix(tmp_path: Path, text: str, names: str) -> None:
    path = tmp_path / "serve.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert names in str(err.value) and str(path) in str(err.value)


def test_config_file_flags_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "serve.toml"
    path.write_text('mode = "replicate"\ngrid = 4\nmodels_dir = "../m"\n[slowdown]\nspec = "bimodal"\n')
    config = load_config(path, {"grid": "auto", "port": 0, "slowdown.workers": [1], "threads": None})
    assert (config.mode, config.grid, config.port) == ("replicate", "auto", 0)
    assert config.models_dir == (tmp_path / "m").resolve()
    assert config.scnn_count == 10 and config.k == 9  # replicate: k + 1, k sized for S = 3 under auto
    assert config.slowdown.slows("scnn", 1) and not config.slowdown.slows("scnn", 0)
    own = config.slowdown.for_worker("scnn", 1)
    assert own is not None and (own.spec, own.kind, own.seed) == ("bimodal", "per-request", 1)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="flags: `grid` \(--grid\)"):
        config.with_overrides({"grid": 0})
    with pytest.raises(ConfigError, match="--scnn"):
        load_config(None, {"scnn": ["http://h:1"]})


def test_examples_parse(models_dir: Path) -> None:
    examples = Path(__file__).resolve().parents[2] / "examples"
    local = load_config(examples / "local.toml")
    assert not local.remote and local.models_dir == models_dir.resolve() and local.slowdown.workers == (0,)
    remote = load_config(examples / "cluster.toml")
    assert remote.remote and remote.scnn_count == 3 and remote.collage[0].arg.endswith("#collage-3x3")
    triton = load_config(examples / "triton" / "frontend.toml")
    assert [w.model_file for w in triton.scnn + triton.collage] == [
        (models_dir / "scnn.onnx").resolve(),
        (models_dir / "collage-3x3.onnx").resolve(),
    ]


def test_mode_parm_serves_the_parity_model_of_its_code(models_dir: Path) -> None:
    config = load_config(
        None, {"mode": "parm", "parity_k": 2, "parity_encoder": "sum", "models_dir": models_dir}
    )
    assert config.k == 2 and config.scnn_count == 2  # k s-CNN workers and one parity worker: 1/k
    assert config.collage_models() == {2: models_dir / "parm-k2-sum.onnx"}


def test_missing_models_fail_before_any_process_starts(tmp_path: Path) -> None:
    config = ServeConfig(models_dir=tmp_path, port=0)
    cluster = LocalCluster(config)
    with pytest.raises(ConfigError, match="scnn.onnx"):
        cluster.start()
    assert cluster.processes() == []


# --- a front end over remote workers -----------------------------------------------------------


@pytest.mark.slow
def test_front_end_over_remote_workers(
    models_dir: Path, worker_factory, fashion_test, tmp_path: Path
) -> None:
    folder, grid = shipped(models_dir)
    scnn = worker_factory("--model", str(folder / "scnn.onnx"))
    collage = worker_factory("--model", str(folder / f"collage-{grid}x{grid}.onnx"))
    path = tmp_path / "cluster.toml"
    path.write_text(
        f'mode = "collage"\ngrid = {grid}\nport = 0\n'
        f'[[scnn]]\nurl = "{scnn.url}"\nmodel = "scnn"\n'
        f'[[collage]]\nurl = "{collage.url}"\nmodel = "collage-{grid}x{grid}"\n'
    )
    with LocalCluster(load_config(path)) as cluster:
        assert [p.name for p in cluster.processes()] == ["frontend"]  # workers are not ours to start
        assert cluster.worker_urls == [scnn.url] and cluster.collage_urls == [collage.url]
        assert f"extra cost of the mode: {1 / grid**2:.3f}" in cluster.describe()
        status, meta = get(f"{cluster.url}/v2/models/classifier")
        assert status == 200 and json.loads(meta)["parameters"]["collage_workers"] == 1
        labels = [post(f"{cluster.url}/predict", png_of(fashion_test.images[i])) for i in range(8)]
        assert all(status == 200 for status, _ in labels)
        assert sum(a["label"] == fashion_test.labels[i] for i, (_, a) in enumerate(labels)) >= 6
        assert get(f"{cluster.url}/v2/health/ready")[0] == 200
        scnn.stop()  # the only s-CNN worker goes away: the front end must stop claiming readiness
        post(f"{cluster.url}/predict", png_of(fashion_test.images[0]))  # any answer; it marks it down
        assert get(f"{cluster.url}/v2/health/ready")[0] == 503
        frontend = cluster.frontend
    assert frontend is not None and not frontend.alive


# --- `collage serve` as a process --------------------------------------------------------------


def start_serve(folder: Path, grid: int, *extra: str) -> tuple[subprocess.Popen, str, list[str]]:
    """Run the launcher; wait for its "serving" line; (process, front end URL, its output)."""
    cmd = [sys.executable, "-m", "collage_inference.cli", "serve", "--models-dir", str(folder)]
    cmd += ["--grid", str(grid), "--scnn-workers", "1", "--port", "0", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    serving = threading.Event()

    def read() -> None:  # a thread, so the pipe never fills and a blocked read never hangs the test
        for line in proc.stdout:
            lines.append(line.rstrip())
            if line.startswith("serving;"):
                serving.set()

    threading.Thread(target=read, daemon=True).start()
    if not serving.wait(READY_S):
        proc.kill()
        proc.wait()
        raise AssertionError("collage serve did not start:\n" + "\n".join(lines))
    url = next(x.split()[2] for x in lines if x.strip().startswith("front end"))
    return proc, url, lines


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["ctrl-c", "sigterm", "sigkill"]
)
def test_serve_stops_everything_it_started(models_dir: Path, sig: int) -> None:
    folder, grid = shipped(models_dir)
    proc, url, lines = start_serve(folder, grid)
    try:
        tree = process_tree(proc.pid) - {proc.pid}
        assert len(tree) == 3, lines  # one s-CNN worker, one collage worker, the front end
        assert get(f"{url}/v2/health/ready")[0] == 200
        proc.send_signal(sig)
        code = proc.wait(timeout=30)
        # SIGKILL gives the launcher no chance to clean up: its children notice the closed pipe.
        assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 0)
        deadline = time.monotonic() + 20
        while any(running(pid) for pid in tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in tree if running(pid)], "orphan processes"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in process_tree(proc.pid) - {proc.pid}:  # never leave one behind, even on failure
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_serve_reports_a_process_that_dies_at_start(models_dir: Path, tmp_path: Path) -> None:
    folder, grid = shipped(models_dir)
    (tmp_path / "scnn.onnx").write_bytes(b"not a model")
    (tmp_path / f"collage-{grid}x{grid}.onnx").symlink_to(folder / f"collage-{grid}x{grid}.onnx")
    cmd = [sys.executable, "-m", "collage_inference.cli", "serve", "--models-dir", str(tmp_path)]
    cmd += ["--grid", str(grid), "--scnn-workers", "1", "--port", "0"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=READY_S)
    assert result.returncode == 2
    assert "scnn-0 exited with code" in result.stderr and "last output" in result.stderr


@pytest.mark.slow
def test_a_worker_whose_port_is_taken_on_restart_moves_to_a_free_port(models_dir: Path, fashion_test) -> None:
    """A worker restarts on its own port; when that port has been taken it exits with
    ListenError.exit_code, and that code (not its log) makes the launcher start it on a free
    port and tell the front end, which then serves through the new address."""
    folder, grid = shipped(models_dir)
    config = ServeConfig(mode="none", grid=grid, models_dir=folder, port=0, scnn_workers=1)
    with LocalCluster(config) as cluster, socket.socket() as squatter:
        old = cluster.worker_urls[0]
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past its TIME_WAIT sockets
        cluster.kill_worker(0)
        deadline = time.monotonic() + 10
        while True:  # take its port as soon as the kernel frees it, before the restart does
            try:
                squatter.bind(("127.0.0.1", urlsplit(old).port or 0))
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        squatter.listen()
        deadline = time.monotonic() + READY_S
        while not any("front end knows" in e for e in cluster.events):
            assert time.monotonic() < deadline and not cluster.failed, cluster.events
            time.sleep(0.1)
        squatter.close()
        new = cluster.worker_urls[0]
        assert new != old and cluster.scnn[0].ready
        taken = [e for e in cluster.events if "is taken" in e]
        assert len(taken) == 1 and f"exit code {ListenError.exit_code}" in taken[0], cluster.events
        deadline = time.monotonic() + 30  # the only s-CNN worker: an answer means the new address
        while (answer := post(f"{cluster.url}/predict", png_of(fashion_test.images[0])))[0] != 200:
            assert time.monotonic() < deadline, answer
            time.sleep(0.2)


def test_slowdown_settings_for_each_worker() -> None:
    slow = SlowdownSettings(
        "pareto:alpha=2,scale=0.01", "per-instance", seed=5, workers=(0, 2), contention=0.5
    )
    assert slow.slows("scnn", 2) and not slow.slows("scnn", 1) and not slow.slows("collage", 0)
    own = slow.for_worker("scnn", 2)
    assert own is not None and (own.seed, own.kind, own.contention) == (7, "per-instance", 0.5)
    assert slow.for_worker("scnn", 1) is None and slow.for_worker("collage", 0) is None
    # a parity model is a backup: a Ray replica of rank 0 must not straggle as s-CNN worker 0
    assert not slow.slows("parity", 0) and replace(slow, collage=True).slows("parity", 0)
    assert not SlowdownSettings().slows("scnn", 0)
    assert WorkerEndpoint("http://h:1/", "scnn").arg == "http://h:1#scnn"
