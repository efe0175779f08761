"""Serve an exported ONNX file from KServe's Python model server (the `kserve` package), speaking
the V2 protocol in the file's own tensors: FP32 `input` (N, C, H, W) in, `logits` out.

    .venv-triton/bin/python kserve_server.py PORT NAME FILE.onnx

Run with the interpreter of `.venv-triton` (`make setup` builds it).
"""

import sys

import kserve
import numpy as np
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse


class OnnxModel(kserve.Model):
    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.ready = True

    def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        logits = self.session.run(["logits"], {"input": payload.inputs[0].as_numpy().astype(np.float32)})[0]
        output = InferOutput(name="logits", shape=list(logits.shape), datatype="FP32")
        output.set_data_from_numpy(logits, binary_data=False)
        return InferResponse(model_name=self.name, infer_outputs=[output], response_id=payload.id or "0")


if __name__ == "__main__":
    port, name, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    server = kserve.ModelServer(http_port=port, grpc_port=port + 1, workers=1, enable_docs_url=False)
    server.start([OnnxModel(name, path)])
