"""Which tritonserver the launcher starts and which backends it can load: the env-named install, the NGC layout at
/opt/tritonserver, the nvidia-pytriton wheel's (Python backend only); `serving.stack --backend tensorrt` refuses a
server without the TensorRT backend before any repository work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import serving.stack
from serving.errors import SettingError
from serving.triton import install as triton_install
from serving.triton.install import STUB, TRITONSERVER_ENV, TritonInstall

REPO = Path(__file__).resolve().parents[1]


def fake_install(root: Path, backends: tuple[str, ...]) -> Path:
    """Triton's install layout (as in the NGC container), with empty files where the binaries go."""
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "tritonserver").touch()
    (root / "lib").mkdir()
    for name in ("python", *backends):
        (root / "backends" / name).mkdir(parents=True)
        (root / "backends" / name / f"libtriton_{name}.so").touch()
    (root / "backends" / "python" / STUB).touch()
    return root


@pytest.fixture
def no_system_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(TRITONSERVER_ENV, raising=False)
    monkeypatch.setattr(triton_install, "SYSTEM_INSTALL", tmp_path / "no-system-install")


def test_an_install_knows_its_backends_and_links_them(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    root = fake_install(tmp_path / "triton", ("tensorrt",))
    monkeypatch.setenv(TRITONSERVER_ENV, str(root))
    install = TritonInstall.find()
    assert install.binary == root / "bin" / "tritonserver"
    assert install.stub == root / "backends" / "python" / STUB
    assert install.has_backend("tensorrt") and not install.has_backend("onnxruntime")
    install.require_backend("tensorrt")
    backends = install.backend_directory(tmp_path / "build")
    assert (
        backends / "tensorrt" / "libtriton_tensorrt.so"
    ).resolve() == root / "backends/tensorrt/libtriton_tensorrt.so"
    assert (backends / "python" / STUB).resolve() == install.stub
    assert install.backend_directory(tmp_path / "build") == backends  # a second start reuses the links


def test_an_install_without_tensorrt_is_refused_by_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    install = TritonInstall.at(fake_install(tmp_path / "triton", ("onnxruntime",)))
    with pytest.raises(SettingError, match=r"no tensorrt backend .*it has: onnxruntime, python\)") as refused:
        install.require_backend("tensorrt")
    assert refused.value.setting == "backend" and "deploy/triton.Dockerfile" in str(refused.value)
    assert not (install.backend_directory(tmp_path / "build") / "tensorrt").exists()


def test_the_system_install_comes_before_the_wheel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(TRITONSERVER_ENV, raising=False)
    monkeypatch.setattr(triton_install, "SYSTEM_INSTALL", fake_install(tmp_path / "opt-tritonserver", ("tensorrt",)))
    assert TritonInstall.find().backends == tmp_path / "opt-tritonserver" / "backends"


def test_a_named_folder_that_is_no_install_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(TRITONSERVER_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=TRITONSERVER_ENV):
        TritonInstall.find()


@pytest.mark.usefixtures("no_system_install")
def test_the_wheels_server_has_the_python_backend_only() -> None:
    install = TritonInstall.find()
    assert "pytriton" in install.binary.parts
    assert install.has_backend("python") and not install.has_backend("tensorrt")


@pytest.mark.usefixtures("no_system_install")
def test_the_stack_refuses_tensorrt_before_any_repository_work(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def never(*args: object, **kwargs: object) -> Path:
        raise AssertionError("the repository was being prepared (ONNX export, engine build)")

    monkeypatch.setattr(serving.stack, "prepare_repository", never)
    argv = ["--backend", "tensorrt", "--model-repository", str(tmp_path / "repo"), "--build-dir", str(tmp_path / "b")]
    with pytest.raises(SettingError, match="no tensorrt backend"):
        serving.stack.main(argv)
    assert not list(tmp_path.iterdir())


def test_the_stack_command_refuses_in_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """What `make serve SERVE_ARGS='--backend tensorrt'` prints here: the reason and the way, no traceback."""
    monkeypatch.delenv(TRITONSERVER_ENV, raising=False)
    if TritonInstall.find().has_backend("tensorrt"):
        pytest.skip("this machine's tritonserver has the TensorRT backend")
    argv = ["--backend", "tensorrt", "--model-repository", str(tmp_path / "repo"), "--build-dir", str(tmp_path / "b")]
    done = subprocess.run(
        [sys.executable, "-m", "serving.stack", *argv], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert line.startswith("serving.stack: backend: tensorrt: the tritonserver at ")
    assert "libtriton_tensorrt.so" in line and "deploy/triton.Dockerfile" in line
    assert not list(tmp_path.iterdir())
