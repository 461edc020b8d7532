"""Deployment forms: program rewrites per runtime, ONNX conversion, int8 quantization, and detections from
images on an export (preprocessing, runtime, drawing). Imports no PaddleDetection."""
