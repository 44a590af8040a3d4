"""ONNX export: the ``ultramem`` domain, its function bodies, the exporter and a runner."""
