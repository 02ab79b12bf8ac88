"""Which `tritonserver` runs, and the backend folder it loads: the install env OMNIGEN2_TRITONSERVER names, else the
NGC container's /opt/tritonserver, else the nvidia-pytriton wheel's. The wheel ships the server binary, its libraries,
the Python backend only and one backend stub per Python version; Triton wants the stub next to `libtriton_python.so`,
so a backend folder of links is assembled under the build directory for the running interpreter, and nothing is
written into the install. The install's other backends (the NGC one's `tensorrt`, ...) are linked into it as they are.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from serving.errors import SettingError

TRITONSERVER_ENV = "OMNIGEN2_TRITONSERVER"  # the root of a Triton install (bin/, lib/, backends/) to use
SYSTEM_INSTALL = Path("/opt/tritonserver")  # the NGC container's
STUB = "triton_python_backend_stub"


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    libs: Path
    backends: Path  # one folder per backend, holding libtriton_<name>.so
    stub: Path  # the Python backend's stub for this interpreter

    @property
    def python_backend(self) -> Path:
        return self.backends / "python"

    @classmethod
    def find(cls) -> TritonInstall:
        """The install named by env OMNIGEN2_TRITONSERVER, else /opt/tritonserver, else the nvidia-pytriton wheel's."""
        named = os.environ.get(TRITONSERVER_ENV)
        if named:
            return cls.at(Path(named))
        if (SYSTEM_INSTALL / "bin" / "tritonserver").is_file():
            return cls.at(SYSTEM_INSTALL)
        return cls.wheel()

    @classmethod
    def at(cls, root: Path) -> TritonInstall:
        """An install in Triton's layout; its Python backend carries the stub built for the install's Python."""
        backends = root / "backends"
        return cls(root / "bin" / "tritonserver", root / "lib", backends, backends / "python" / STUB).checked(
            f"is {root} a Triton install ({TRITONSERVER_ENV})?"
        )

    @classmethod
    def wheel(cls) -> TritonInstall:
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        hint = f"is nvidia-pytriton installed for Python {version}?"
        # Found, not imported: the package's own modules need gevent, zmq, ... (its Python API), the server not.
        spec = importlib.util.find_spec("pytriton")
        if spec is None or spec.origin is None:
            raise FileNotFoundError(f"no tritonserver found: {hint} (or set {TRITONSERVER_ENV})")
        root = Path(spec.origin).resolve().parent
        server = root / "tritonserver"
        return cls(
            binary=server / "bin" / "tritonserver",
            libs=root.parent / "nvidia_pytriton.libs",
            backends=server / "backends",
            stub=server / "python_backend_stubs" / version / STUB,
        ).checked(hint)

    def checked(self, hint: str) -> TritonInstall:
        for path in (self.binary, self.python_backend, self.stub):
            if not path.exists():
                raise FileNotFoundError(f"{path}: not found; {hint}")
        return self

    def has_backend(self, name: str) -> bool:
        return (self.backends / name / f"libtriton_{name}.so").is_file()

    def require_backend(self, name: str) -> None:
        """Refuse, before anything is built for it, a backend this server cannot load."""
        if self.has_backend(name):
            return
        present = ", ".join(sorted(p.name for p in self.backends.iterdir() if p.is_dir()))
        raise SettingError(
            "backend",
            f"{name}: the tritonserver at {self.binary} has no {name} backend (no backends/{name}/libtriton_{name}.so; "
            f"it has: {present}). The NGC Triton container has it: deploy/triton.Dockerfile, or set "
            f"{TRITONSERVER_ENV} to a Triton install with it",
        )

    def backend_directory(self, build_dir: Path) -> Path:
        """A backends/ folder whose python/ holds links to the backend files and this Python's stub, beside links to
        the install's other backends."""
        directory = build_dir / "triton-backends"
        python_dir = directory / "python"
        python_dir.mkdir(parents=True, exist_ok=True)
        for source in [*self.python_backend.iterdir(), self.stub]:
            _link(python_dir / source.name, source)
        for source in self.backends.iterdir():
            if source.is_dir() and source.name != "python":
                _link(directory / source.name, source)
        return directory


def _link(link: Path, source: Path) -> None:
    if link.is_symlink() or link.exists():
        if link.resolve() == source.resolve():
            return
        link.unlink()
    link.symlink_to(source)
