"""The torch-free runtime: numpy, onnxruntime, tokenizers and Pillow only."""
