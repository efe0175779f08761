"""How the front end reaches a model server: one small interface, one module per transport.

    base.py   Transport (infer, ready, describe, close), ModelInfo, Inference
    http.py   HttpTransport: a V2 server over HTTP (our workers, or any server that speaks V2)
    ray.py    RayTransport: a Ray Serve deployment through its handle (needs the ray extra)
    fake.py   FakeTransport: a model server in memory, for tests and examples

The :class:`~collage_inference.serving.pool.WorkerPool` owns everything around a call:
picking a worker, counting its outstanding calls, marking it down, probing it back.
"""

from collage_inference.serving.transports.base import Inference, ModelInfo, Transport

__all__ = ["Inference", "ModelInfo", "Transport"]
