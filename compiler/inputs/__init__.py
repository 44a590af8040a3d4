"""What a user gives the CLI (options, a MODEL, the errors either can cause), checked
before any long import or work: nothing in this package imports torch, ONNX or Triton."""
