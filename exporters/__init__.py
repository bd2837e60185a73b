"""Exporters: ONNX (int8 quantized too), TorchScript and AOTInductor (.pt2) graphs of Reformer models and Triton
model repositories, driven by one export spec per task, verified on real runtimes against eager PyTorch."""
