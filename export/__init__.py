"""Export side: model loading, ONNX graphs, engine folder builds."""
