"""Command line: checkpoint -> Triton model repository. The library is serving/build/repository.py."""

from serving.build.repository import main

if __name__ == "__main__":
    main()
