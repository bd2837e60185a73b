"""The client of a model served by Triton Inference Server: `TritonModel(name, url)` takes the calls of
`reformer.runtime.OnnxModel` and `OnnxGenerator.generate` and sends them to a model of a repository that
`reformer-export --format triton` wrote (served by `reformer-serve`), over HTTP or gRPC, through tritonclient
(the `serve` extra), which is imported only when a client is made. numpy and `reformer.runtime` only, no torch."""

from __future__ import annotations

import numpy as np

from reformer.runtime import pad_batch

from .backend import GENERATION_OPTIONS


class TritonModel:
    """A model served by Triton Inference Server from a repository `reformer-export --format triton` wrote, called
    as `OnnxModel` (task models) and `OnnxGenerator.generate` (generation models) are. Needs tritonclient (the
    `serve` extra). One instance per thread: tritonclient's clients are not shared between threads. A request the
    server refuses raises tritonclient.utils.InferenceServerException with the server's message."""

    def __init__(self, name: str, url: str = "localhost:8000", protocol: str = "http"):
        """name: the model's name in the repository (<model>-<task>); url: host:port of the server's HTTP (8000 by
        default) or gRPC (8001) endpoint, as `protocol` says."""
        if protocol == "http":
            import tritonclient.http as client
        elif protocol == "grpc":
            import tritonclient.grpc as client
        else:
            raise ValueError(f"protocol must be http or grpc, got {protocol!r}")
        self.client_module = client
        self.client = client.InferenceServerClient(url)
        self.name = name
        metadata = self.client.get_model_metadata(name, **({"as_json": True} if protocol == "grpc" else {}))
        self.output_names = [output["name"] for output in metadata["outputs"]]

    def infer(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One request: {input name: array, batch axis first} -> {output name: array}."""
        from tritonclient.utils import np_to_triton_dtype

        inputs = []
        for name, array in arrays.items():
            tensor = self.client_module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        outputs = [self.client_module.InferRequestedOutput(name) for name in self.output_names]
        result = self.client.infer(self.name, inputs, outputs=outputs)
        return {name: result.as_numpy(name) for name in self.output_names}

    def __call__(self, input_ids, attention_mask=None, pad_token_id: int = 0) -> dict[str, np.ndarray]:
        """As `OnnxModel.__call__`: ids B, L or a ragged list (padded here), an optional mask."""
        ids, mask = pad_batch(input_ids, attention_mask, pad_token_id)
        return self.infer({"input_ids": ids, "attention_mask": mask})

    def generate(self, input_ids, max_new_tokens: int, **options) -> np.ndarray:
        """As `OnnxGenerator.generate` for prompts of one length (ids B, T): the prompts followed by the new
        tokens. options: those of exporters.triton.backend.GENERATION_OPTIONS (do_sample, temperature, ...)."""
        ids = np.asarray(input_ids, dtype=np.int64)
        unknown = sorted(set(options) - set(GENERATION_OPTIONS))
        if unknown:
            raise ValueError(f"unknown generation option {unknown[0]!r}: the options are "
                             f"{', '.join(GENERATION_OPTIONS)}")
        arrays = {"input_ids": ids, "max_new_tokens": np.full((len(ids), 1), max_new_tokens, dtype=np.int32)}
        arrays.update({name: np.full((len(ids), 1), value, dtype=GENERATION_OPTIONS[name])
                       for name, value in options.items() if value is not None})
        return np.concatenate([ids, self.infer(arrays)["output_ids"]], axis=1)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "TritonModel":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
