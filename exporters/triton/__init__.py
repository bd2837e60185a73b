"""Serving on Triton Inference Server, one module per concern:

- `layout`: the model repository `reformer-export --format triton` writes around a finished, verified export
  (config.pbtxt, version folder, model.py);
- `backend`: the Python-backend models each repository's model.py imports, run by the server;
- `server`: a real tritonserver started and stopped from Python (`reformer-serve`);
- `client`: `TritonModel`, the calls of `reformer.runtime`'s classes on a served model.

Nothing is imported here: `backend` and `client` load without torch (numpy, onnxruntime, tritonclient), in the
server's Python process and in applications."""
