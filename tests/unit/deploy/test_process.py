"""The settings files a LocalCluster hands its children: each one reads back as the very object
the launcher built (no flags in between), checked without starting a process."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from collage_inference.config import (
    ServeConfig,
    SlowdownSettings,
    WorkerEndpoint,
    WorkerSettings,
    load_config,
)
from collage_inference.deploy.local import LocalCluster, config_for_frontend, worker_settings

TOKEN = "s3cret-token"


@pytest.fixture
def config(tmp_path: Path) -> ServeConfig:
    """Collage mode on 2 x 2 over placeholder model files (only their paths are read before a
    start), straggling s-CNN worker 1 and the collage worker, with a token file."""
    for stem in ("scnn", "collage-2x2"):
        (tmp_path / f"{stem}.onnx").write_bytes(b"")
    token = tmp_path / "token"
    token.write_text(TOKEN)
    slow = SlowdownSettings("bimodal", seed=10, workers=(1,), collage=True)
    return ServeConfig(grid=2, port=0, models_dir=tmp_path, threads=2, token_file=token, slowdown=slow)


def settings_file(arguments: list[str]) -> Path:
    """The file a child is started with (``--config FILE``)."""
    assert arguments[0] == "--config" and len(arguments) == 2
    return Path(arguments[1])


def test_worker_settings_files_read_back_as_built(config: ServeConfig) -> None:
    cluster = LocalCluster(config)
    cluster.prepare()
    try:
        proc = cluster.scnn[1]
        path = settings_file(proc.arguments())
        loaded = WorkerSettings.load(path)
        assert loaded == worker_settings(config, config.models_dir / "scnn.onnx", "scnn", 1)
        assert (loaded.name, loaded.host, loaded.port, loaded.threads) == ("scnn", "127.0.0.1", 0, 2)
        assert loaded.token_file == config.token_file and TOKEN not in path.read_text()
        assert loaded.slowdown == replace(config.slowdown, seed=11)  # its own seed
        assert WorkerSettings.load(settings_file(cluster.scnn[0].arguments())).slowdown is None
        collage = WorkerSettings.load(settings_file(cluster.collage[0].arguments()))
        assert collage.model_path == config.models_dir / "collage-2x2.onnx" and collage.name == "collage-2x2"
        assert collage.slowdown is not None and collage.slowdown.seed == 10 + 1000
        proc.port = 8123  # learnt from its ready line: every restart is written with it
        assert WorkerSettings.load(settings_file(proc.arguments())) == replace(loaded, port=8123)
    finally:
        cluster.stop()
    assert not path.parent.exists()  # the private settings folder goes with the cluster


def test_frontend_config_file_reads_back_as_built(config: ServeConfig) -> None:
    asked: list[str] = []

    def interpose(name: str, url: str) -> str:
        asked.append(name)
        return url.replace("127.0.0.1", "localhost")

    cluster = LocalCluster(config, interpose=interpose)
    cluster.prepare()
    try:
        workers = cluster.scnn + cluster.collage
        for i, proc in enumerate(workers):
            proc.url = f"http://127.0.0.1:{9000 + i}"  # as its ready line would say
        assert cluster.frontend is not None
        path = settings_file(cluster.frontend.arguments())
        loaded = load_config(path)
        scnn = [WorkerEndpoint(f"http://localhost:{9000 + i}", "scnn") for i in range(len(cluster.scnn))]
        collage = [WorkerEndpoint(f"http://localhost:{9000 + len(scnn)}", "collage-2x2")]
        assert loaded == config_for_frontend(config, scnn, collage, 0)
        assert loaded == replace(config, scnn=tuple(scnn), collage=tuple(collage))  # the rest as given
        assert TOKEN not in path.read_text()
        cluster.frontend.port = 8000  # a restart keeps the front end's port
        assert load_config(settings_file(cluster.frontend.arguments())).port == 8000
        assert asked == [p.name for p in workers]  # interposed once each, not at every restart
    finally:
        cluster.stop()
    assert not path.parent.exists()
