"""Serve exported ONNX files from a real Triton Inference Server (the one `nvidia-pytriton`
bundles), in their own tensors: FP32 `input` (N, C, H, W) in, `logits` out.

    .venv-triton/bin/python examples/triton/pytriton_server.py PORT NAME=FILE.onnx [NAME=FILE.onnx ...]
        [--slow NAME:P:SECONDS]

Run with the interpreter of `.venv-triton` (`make setup` builds it) and LD_LIBRARY_PATH holding
that interpreter's LIBDIR (the Python backend links libpython). ``--slow NAME:P:SECONDS`` makes a
call to model NAME straggle with probability P for SECONDS (seeded), as a slow instance would.
Triton takes PORT (HTTP), PORT + 1 (gRPC) and PORT + 2 (metrics). Prints ``ready on
http://127.0.0.1:PORT`` once the models are loaded. Without Docker or a Triton build this is
the quickest way to a real Triton; `scripts/bench-triton.sh` and the tests in front of Triton
start it this way.
"""

import random
import sys
import time

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig


def dims(shape: list) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else -1 for d in shape[1:])


def model(path: str, slow: tuple[float, float] | None, rng: random.Random):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])

    @batch
    def infer(input: np.ndarray) -> dict[str, np.ndarray]:
        if slow is not None and rng.random() < slow[0]:
            time.sleep(slow[1])
        return {"logits": session.run(["logits"], {"input": input})[0]}

    return infer, dims(session.get_inputs()[0].shape), dims(session.get_outputs()[0].shape)


def main() -> None:
    port, args = int(sys.argv[1]), sys.argv[2:]
    slow: dict[str, tuple[float, float]] = {}
    if "--slow" in args:
        name, p, seconds = args.pop(args.index("--slow") + 1).split(":")
        args.remove("--slow")
        slow[name] = (float(p), float(seconds))
    config = TritonConfig(http_address="127.0.0.1", http_port=port, grpc_address="127.0.0.1",
                          grpc_port=port + 1, metrics_port=port + 2)  # fmt: skip
    with Triton(config=config) as triton:
        for item in args:
            name, path = item.split("=", 1)
            infer, shape, out = model(path, slow.get(name), random.Random(0))
            triton.bind(
                model_name=name,
                infer_func=infer,
                inputs=[Tensor(name="input", dtype=np.float32, shape=shape)],
                outputs=[Tensor(name="logits", dtype=np.float32, shape=out)],
                config=ModelConfig(max_batch_size=64),
            )
        print(f"ready on http://127.0.0.1:{port}", flush=True)
        triton.serve()


if __name__ == "__main__":
    main()
