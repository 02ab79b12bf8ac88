"""Command line: ONNX graphs -> TensorRT engines (exits 2 where there is no GPU or TensorRT). The library is
serving/artifacts/engines.py."""

import sys

from serving.artifacts.engines import main

if __name__ == "__main__":
    sys.exit(main())
