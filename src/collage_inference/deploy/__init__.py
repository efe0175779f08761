"""The launchers: start a deployment, supervise it, stop it. ``serving/`` is the request path
(front end, workers, Ray deployments); ``deploy/`` starts and keeps it running.

    process.py  ManagedProcess: one child started from a settings file, watched, reaped, and
                stopped with its launcher (no orphans)
    local.py    LocalCluster and ``collage serve``: workers and front end as local processes
    ray.py      RayCluster: the same ServeConfig as a Ray Serve application (``--backend ray``)

Both launchers give their children the same config objects (:mod:`collage_inference.config`).
"""
