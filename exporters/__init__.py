"""Exporters: ONNX and TorchScript graphs of Reformer models, driven by one export spec per task, verified
on real runtimes against eager PyTorch."""
