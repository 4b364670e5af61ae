"""Deployment: exporting models to formats other runtimes read (ONNX)."""
