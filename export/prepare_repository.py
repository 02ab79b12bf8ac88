"""Command line: checkpoint -> Triton model repository. The library is serving/artifacts/repository.py."""

from serving.artifacts.repository import main

if __name__ == "__main__":
    main()
