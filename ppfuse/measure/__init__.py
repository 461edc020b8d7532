"""Measurement: the side-by-side benchmark, COCO mAP parity, family coverage, runtime parity, quantization
error (SQNR), the generated shapes data, and the dated result files they all write."""
