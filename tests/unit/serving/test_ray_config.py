"""The Ray backend's config and the missing-extra error: no Ray processes, Ray not needed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from collage_inference.config import ServeConfig, load_config
from collage_inference.deploy.ray import require_ray
from collage_inference.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def test_the_ray_example_parses(models_dir: Path) -> None:
    config = load_config(EXAMPLES / "ray.toml")
    assert config.backend == "ray" and config.ray.address == "local" and config.models_dir == models_dir
    assert config.scnn_count == 9 and config.slowdown.workers == (0,)
    joined = load_config(EXAMPLES / "ray.toml", {"ray.address": "auto", "ray.scnn_replicas": 4})
    assert not joined.ray.owns_cluster and joined.scnn_count == 4


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"ray.address": "nowhere"}, "--address"),
        ({"ray.scnn_cpus": 0}, "[ray] scnn_cpus"),
        ({"ray.min_replicas": 5, "ray.max_replicas": 2}, "min_replicas"),
        ({"ray.replicas": 3}, "unknown config key `ray.replicas`"),
        ({"backend": "kubernetes"}, "`backend`"),
        ({"backend": "ray", "scnn": ["http://h:1#scnn"], "collage": ["http://h:2#c"]}, "cannot front"),
    ],
)
def test_bad_ray_settings_name_the_key(overrides: dict, names: str) -> None:
    with pytest.raises(ConfigError, match=names.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, overrides)


def test_local_cpus_refuse_what_cannot_be_placed() -> None:
    pytest.importorskip("ray")
    from collage_inference.deploy.ray import local_cpus, requested_cpus

    config = load_config(None, {"backend": "ray", "grid": 2, "ray.num_cpus": 2})
    assert requested_cpus(config) == 6.0  # 4 s-CNN + 1 collage + the ingress, 1 CPU each
    with pytest.raises(ConfigError, match="reserve 6 CPUs but"):
        local_cpus(config)
    assert local_cpus(ServeConfig(backend="ray", grid=2)) >= 6  # unset: enough for every replica


def test_missing_ray_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'collage-inference\[ray\]'"):
        require_ray()
