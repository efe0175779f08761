"""The serving config: typed, validated, loaded from a TOML file and overridable by flags.

    config = load_config(Path("examples/local.toml"), {"mode": "replicate", "grid": "auto"})

One frozen :class:`ServeConfig` describes a whole deployment: the redundancy mode and grid, the
front end's knobs, and its workers. Workers are either *local* (the launcher starts them from
the models in ``models_dir``, optionally straggling on purpose) or *remote* (``[[scnn]]`` and
``[[collage]]`` tables list V2 model servers already running anywhere; the launcher then starts
only the front end). File keys and flags share names (``request_timeout`` is
``--request-timeout``), so every :class:`ConfigError` names both, says what was wrong and how to
fix it. Relative paths in a file are relative to the file, so a config can ship beside the
models it names.

File layout (every key optional)::

    mode = "collage"          # none | equal | replicate | hedge | replicate-all | collage | collage-2 | parm
    grid = 3                  # collage side S (k = S*S), or "auto"
    parity_k = 4              # mode parm: requests per parity query (2 or 4)
    parity_encoder = "concat" # mode parm: concat | sum (collage_inference.parm)
    policy = "confident"      # confident | patient | first
    confident_at = 0.9        # policy confident: a collage cell this sure answers at once
    group_timeout = 0.01      # seconds; omit for the adaptive group deadline
    request_timeout = 5.0
    replicate_timeout = 0.1
    reissue_to = "idle"       # or "least-loaded": where a re-issue for lateness goes
    max_pending = 4096
    model_name = "classifier"
    host = "127.0.0.1"
    port = 8000
    models_dir = "../models/fashion-mnist"
    threads = 1               # engine threads per local worker
    scnn_workers = 9          # omit: what the mode needs for k
    ready_timeout = 60.0
    restart = true            # restart local workers that die
    token_file = "token.txt"  # shared bearer token for clients and workers (or $COLLAGE_TOKEN)

    [slowdown]                # straggler injection into local workers (off by default)
    spec = "pareto:alpha=1.5,scale=0.05"
    kind = "per-request"      # per-request | per-instance
    seed = 0
    workers = [0]             # which s-CNN workers straggle; omit for all of them
    collage = false           # whether collage workers straggle too
    contention = 0.0
    onset_rate = 0.05
    period = 2.0

    [[scnn]]                  # remote workers instead of local ones
    url = "http://10.0.0.5:8001"
    model = "scnn"

    backend = "local"         # local (processes on this machine) | ray (Ray Serve deployments)
    [ray]                     # the Ray Serve backend (see docs/ray.md and examples/ray.toml)
    address = "local"         # local: a private Ray on this machine | auto | ray://HOST:10001
    scnn_replicas = 9         # omit: what the mode needs; ignored under autoscaling
    scnn_cpus = 1.0           # logical CPUs reserved per s-CNN replica (fractions allowed)
    autoscaling = false       # then min/max_replicas and target_ongoing_requests apply
"""

from collage_inference.config.common import AUTO, DEFAULT_MODELS_DIR, MAX_GRID, REPO_ROOT
from collage_inference.config.flags import (
    add_frontend_arguments,
    add_slowdown_arguments,
    frontend_overrides,
    slowdown_overrides,
)
from collage_inference.config.loading import dump_config, load_config
from collage_inference.config.serve import FrontEndSettings, ServeConfig
from collage_inference.config.workers import (
    FACT_KEYS,
    Limits,
    RaySettings,
    SlowdownSettings,
    WorkerEndpoint,
    WorkerSettings,
)

__all__ = [
    "AUTO",
    "DEFAULT_MODELS_DIR",
    "FACT_KEYS",
    "MAX_GRID",
    "REPO_ROOT",
    "FrontEndSettings",
    "Limits",
    "RaySettings",
    "ServeConfig",
    "SlowdownSettings",
    "WorkerEndpoint",
    "WorkerSettings",
    "add_frontend_arguments",
    "add_slowdown_arguments",
    "dump_config",
    "frontend_overrides",
    "load_config",
    "slowdown_overrides",
]
