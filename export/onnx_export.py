"""Command line: checkpoint -> ONNX graphs + manifest. The library is serving/artifacts/onnx_export.py."""

from serving.artifacts.onnx_export import main

if __name__ == "__main__":
    main()
