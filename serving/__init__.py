"""serving — export to ONNX, ONNX Runtime and TensorRT backends of the decoder-step interface, the HTTP server.

Everything here sits above `nmt` and is imported lazily by `nmt.cli`; nothing in `nmt` imports this package.
"""
