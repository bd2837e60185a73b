"""The runtimes a benchmark times, behind one interface: `outputs` (for comparison, on the CPU's terms) and
`timed_call` (one run on the device, inputs already there). Torch is imported when first used, so that bad
options fail before it loads."""

from __future__ import annotations

from pathlib import Path

from benchmarks.gpu_checks.steps import RuntimeUnavailable, log

CUDA_PROVIDER, CPU_PROVIDER = "CUDAExecutionProvider", "CPUExecutionProvider"


def ort_providers(device: str) -> list[str]:
    """The providers for `device`; reformer.runtime.open_session gives CUDA its options (an arena grown by
    what runs ask for, so that its size means something; TF32 only when asked)."""
    return [CPU_PROVIDER] if device == "cpu" else [CUDA_PROVIDER, CPU_PROVIDER]


class OrtRunner:
    """An ONNX Runtime session on `device`; refuses to exist when CUDA was asked for and is not first in the
    session's providers (ONNX Runtime falls back to the CPU silently)."""

    def __init__(self, path: Path, device: str, tf32: bool = False, threads: int | None = None):
        from reformer.runtime import open_session

        self.device = device
        self.session = open_session(path, ort_providers(device), quiet=True, threads=threads, tf32=tf32)
        self.providers = self.session.get_providers()
        log(f"onnxruntime session {path.name} ({'tf32' if tf32 else 'strict fp32'} on {device}): {self.providers}")
        if device == "cuda" and self.providers[0] != CUDA_PROVIDER:
            raise RuntimeUnavailable(f"onnxruntime session fell back to {self.providers}")
        self.input_names = [graph_input.name for graph_input in self.session.get_inputs()]
        self.output_names = [output.name for output in self.session.get_outputs()]

    def feeds(self, input_ids, attention_mask) -> dict:
        return dict(zip(self.input_names, (input_ids.cpu().numpy(), attention_mask.cpu().numpy())))

    def outputs(self, input_ids, attention_mask) -> list:
        import torch

        return [torch.from_numpy(output) for output in self.session.run(None, self.feeds(input_ids, attention_mask))]

    def timed_call(self, input_ids, attention_mask):
        """A call that runs the graph once. On CUDA, inputs and outputs stay on the device (IO binding), as
        eager's do."""
        feeds = self.feeds(input_ids, attention_mask)
        if self.device == "cpu":
            return lambda: self.session.run(None, feeds)
        import onnxruntime

        binding = self.session.io_binding()
        device_inputs = {name: onnxruntime.OrtValue.ortvalue_from_numpy(array, "cuda", 0) for name, array in feeds.items()}
        for name, value in device_inputs.items():
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, "cuda")

        def run():
            self.session.run_with_iobinding(binding)
            return device_inputs  # the closure keeps the device inputs alive as long as the binding is used

        return run


class TorchRunner:
    """Eager PyTorch (the export wrapper), a loaded TorchScript module or a loaded AOTInductor package, with
    OrtRunner's interface."""

    def __init__(self, module, device: str, weight_bytes: int | None = None):
        """weight_bytes: the module's weights, counted in its CUDA peak (the runs' rise in allocated memory leaves
        out the weights resident before); None: its parameters and buffers. A package has none to count, but
        holds a copy of the weights of the module it was exported from: give those."""
        self.module = module
        self.device = device
        self.providers = []
        self.weight_bytes = weight_bytes if weight_bytes is not None else sum(
            tensor.numel() * tensor.element_size() for tensor in (*module.parameters(), *module.buffers()))

    def forward(self, input_ids, attention_mask):
        return self.module(input_ids, attention_mask)

    def outputs(self, input_ids, attention_mask) -> list:
        outputs = self.forward(input_ids.to(self.device), attention_mask.to(self.device))
        return [outputs] if not isinstance(outputs, (tuple, list)) else list(outputs)

    def timed_call(self, input_ids, attention_mask):
        return lambda: self.forward(input_ids, attention_mask)


class TransformersRunner(TorchRunner):
    """transformers' ReformerModelWithLMHead (benchmarks.models.reference_model), forward only: no cache, and
    its logits, which is what our causal-lm graphs return."""

    def forward(self, input_ids, attention_mask):
        return self.module(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def tf32_matmuls(enabled: bool):
    """exporters.runners.tf32_matmuls, imported when first used (exporters load torch)."""
    from exporters.runners import tf32_matmuls as switch

    return switch(enabled)
