"""Command line: checkpoint -> ONNX graphs + manifest. The library is serving/build/onnx_export.py."""

from serving.build.onnx_export import main

if __name__ == "__main__":
    main()
