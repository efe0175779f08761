"""A ServeConfig from a TOML (or JSON) file and flag overrides, and back to JSON for a child
process. Keys are flat (``slowdown.seed``); unknown keys are refused with a suggestion."""

from __future__ import annotations

import difflib
import json
import tomllib
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from collage_inference.config.common import bad
from collage_inference.config.serve import ServeConfig
from collage_inference.config.workers import FACT_KEYS, RaySettings, SlowdownSettings, WorkerEndpoint
from collage_inference.errors import ConfigError

_TOP = {f.name for f in fields(ServeConfig)} - {"slowdown", "scnn", "collage", "ray"}
_SLOW = {f.name for f in fields(SlowdownSettings)}
_RAY = {f.name for f in fields(RaySettings)}


def load_config(path: Path | str | None = None, overrides: Mapping[str, Any] | None = None) -> ServeConfig:
    """The config of a TOML file (or the defaults), with flag ``overrides`` applied on top.

    Override keys are the file's keys; slowdown keys are ``slowdown.spec``, ``slowdown.seed``
    ...; ``scnn`` / ``collage`` take lists of ``URL#MODEL`` strings or :class:`WorkerEndpoint`.
    """
    data: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        path = Path(path)
        origin = str(path)
        try:
            with path.open("rb") as f:
                data = json.load(f) if path.suffix == ".json" else _flat_from_toml(tomllib.load(f), path)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist; see examples/local.toml") from None
        except (OSError, ValueError) as exc:  # TOMLDecodeError and JSONDecodeError are ValueErrors
            raise ConfigError(f"config file {path} is not valid TOML or JSON: {exc}") from exc
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if given:
        origin = "flags" if path is None else f"{origin} with flags"
    return build({**data, **given}, origin)


def _flat_from_toml(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """The file as flat keys (``slowdown.seed``), relative paths resolved against the file."""
    data: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("slowdown", "ray"):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: `{key}` must be a table: [{key}] ...")
            data.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            data[key] = value
    for key in ("models_dir", "token_file"):
        if isinstance(data.get(key), str):
            data[key] = (path.parent / Path(data[key]).expanduser()).resolve()
    for table in [*(data.get("scnn") or []), *(data.get("collage") or [])]:
        if isinstance(table, dict) and isinstance(table.get("model_file"), str):
            table["model_file"] = (path.parent / Path(table["model_file"]).expanduser()).resolve()
    if isinstance(data.get("slowdown.spec"), str) and data["slowdown.spec"].startswith("trace:"):
        rest = data["slowdown.spec"][len("trace:") :]
        if rest and not Path(rest.split(":")[0]).expanduser().is_absolute():
            data["slowdown.spec"] = f"trace:{(path.parent / rest).resolve()}"
    return data


def _endpoints(value: Any, key: str) -> tuple[WorkerEndpoint, ...]:
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise ConfigError(f'`{key}` must be an array of tables: [[{key}]] url = "http://..." model = ...')
    out = []
    for item in value:
        if isinstance(item, WorkerEndpoint):
            out.append(item)
        elif isinstance(item, str):
            url, sep, rest = item.partition("#")
            model, _, model_file = rest.partition("@")
            if not sep:
                raise bad(key, f"has {item!r}", "write each worker as http://HOST:PORT#MODEL[@MODEL_FILE]")
            out.append(WorkerEndpoint(url, model, model_file or None))
        elif isinstance(item, dict):
            extra = set(item) - {"url", "model", "model_file", "contract", *FACT_KEYS}
            if extra or "url" not in item or "model" not in item:
                raise ConfigError(
                    f"each [[{key}]] table takes `url` and `model`, and optionally `model_file`, "
                    f"`contract` and the model's facts ({', '.join(FACT_KEYS)}); got {sorted(item)}"
                )
            facts = {k: item[k] for k in FACT_KEYS if k in item}
            out.append(
                WorkerEndpoint(
                    item["url"], item["model"], item.get("model_file"), item.get("contract"), facts
                )
            )
        else:
            raise bad(key, f"has {item!r}", "list tables with url and model")
    return tuple(out)


def build(data: dict[str, Any], origin: str) -> ServeConfig:
    """A validated ServeConfig from flat keys; unknown keys are refused with a suggestion."""
    known = _TOP | {f"slowdown.{k}" for k in _SLOW} | {f"ray.{k}" for k in _RAY} | {"scnn", "collage"}
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"did you mean `{close[0]}`?" if close else f"known keys: {', '.join(sorted(known))}"
            raise ConfigError(f"{origin}: unknown config key `{key}`; {hint}")
    slow = {k.removeprefix("slowdown."): v for k, v in data.items() if k.startswith("slowdown.")}
    ray = {k.removeprefix("ray."): v for k, v in data.items() if k.startswith("ray.")}
    top = {k: v for k, v in data.items() if k in _TOP}
    if isinstance(top.get("models_dir"), str):
        top["models_dir"] = Path(top["models_dir"]).expanduser()
    if isinstance(slow.get("workers"), list):
        slow["workers"] = tuple(slow["workers"])
    try:
        return ServeConfig(
            **top,
            slowdown=SlowdownSettings(**slow),
            ray=RaySettings(**ray),
            scnn=_endpoints(data.get("scnn"), "scnn"),
            collage=_endpoints(data.get("collage"), "collage"),
        )
    except ConfigError as exc:
        raise ConfigError(f"{origin}: {exc}") from exc
    except TypeError as exc:  # a wrong type that the checks above did not anticipate
        raise ConfigError(f"{origin}: {exc}") from exc


def dump_config(config: ServeConfig, path: Path) -> Path:
    """Write ``config`` as JSON in :func:`load_config`'s flat keys: what a launcher hands the
    front end process, so the child reads the very object the launcher built."""
    data = flatten(config)
    data["scnn"] = [e.table() for e in config.scnn]
    data["collage"] = [e.table() for e in config.collage]
    path.write_text(json.dumps(data, default=str))
    return path


def flatten(config: ServeConfig) -> dict[str, Any]:
    """``config`` in flat keys, the inverse of :func:`build`."""
    data = {name: getattr(config, name) for name in _TOP}
    data.update({f"slowdown.{k}": getattr(config.slowdown, k) for k in _SLOW})
    data.update({f"ray.{k}": getattr(config.ray, k) for k in _RAY})
    data["scnn"], data["collage"] = list(config.scnn), list(config.collage)
    return data
