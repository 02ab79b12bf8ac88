"""Building what a served stack runs from a checkpoint: ONNX graphs, TensorRT engines, the Triton model repository.

A library the server uses (`serving/stack.py`); `export/` holds the command-line entry points.
"""
