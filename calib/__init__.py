"""Calibration and quantisation of exported graphs: image sets, the INT8 vision graph, LLM weights.

Torch-free (onnxruntime, onnx, numpy, Pillow): calibration images go through the
runtime's own preprocessing, so the ranges measured are those the deployed graph sees.
"""
