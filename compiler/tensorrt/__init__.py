"""TensorRT engines: the installed package, ONNX preparation, profiles, builds, runs."""
