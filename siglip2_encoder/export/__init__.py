"""Deployment forms of a trained tower: ``onnx_export`` (ONNX graphs checked with onnxruntime), ``quantize`` (torchao
int8 copies) and ``onednn`` (CPU-prepacked copies).

Imports: ``models`` and what it imports; never ``pipeline``, ``serve``, ``integrations`` or ``cli``."""
