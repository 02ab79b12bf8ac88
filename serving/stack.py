"""`make serve`: build the model repository for a checkpoint, then run Triton and the API front end on loopback.

    python -m serving.stack [--checkpoint DIR] [--backend onnxruntime|pytorch|tensorrt] [--precision P] [flags ...]

Front-end flags (see `python -m serving.frontend.server --help`) pass through; Ctrl-C / SIGTERM drains the
front end, then stops Triton. A Triton that dies on its own is cleaned up after and restarted on the same ports, up to
--triton-restarts times in 10 minutes; once more, the stack drains the front end and exits with status 1.
"""

from __future__ import annotations

if __name__ == "__main__":  # `python -m serving.stack`: a stop from here on is held for main, not Python's default
    from serving.interrupts import hold_stops

    hold_stops()

import argparse
import asyncio
import dataclasses
import errno
import importlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omnigen2.client import on_this_machine

from serving.artifacts.disk_errors import disk_errors_named
from serving.choices import BACKENDS, DEVICES
from serving.cli_help import HelpFormatter
from serving.command_flags import (
    add_bls_arguments,
    add_fast_path_arguments,
    add_safety_arguments,
    add_step_cache_arguments,
    check_precision,
)
from serving.errors import OmniGen2Error, SettingError
from serving.flag_types import Address, Whole, from_env
from serving.frontend.config import FrontendConfig
from serving.interrupts import Interrupted, raise_on_stop, restore_stop_signals, stop_on_repeat
from serving.log_format import configure as configure_logging
from serving.triton.install import TRITONSERVER_ENV, TritonInstall
from serving.triton.launcher import TritonServer
from serving.triton.ports import LOOPBACK, Ports, bind_error

if TYPE_CHECKING:  # bound by _import_late once the flags are checked: torch's import takes 6-9 s
    from serving.artifacts.repository import bls_from_args, fast_from_args, prepare_repository, safety_from_args
    from serving.frontend.server import serve
    from serving.model.devices import resolve_device

log = logging.getLogger("omnigen2.stack")
LATE_IMPORTS = {
    "serving.artifacts.repository": ("bls_from_args", "fast_from_args", "prepare_repository", "safety_from_args"),
    "serving.frontend.server": ("serve",),
    "serving.model.devices": ("resolve_device",),
}
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1].parent / "shared" / "golden" / "tiny-omnigen2"


def build_parser() -> argparse.ArgumentParser:
    """The stack's own flags; the front end's pass through (FrontendConfig.parser)."""
    # No abbreviations: the flags this parser does not know go to the front end, and a prefix of one of its own would
    # be taken for it (the front end's --warmup for --warmup-resolutions).
    parser = argparse.ArgumentParser(
        prog="python -m serving.stack", description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=Path(os.environ.get("OMNIGEN2_CHECKPOINT", DEFAULT_CHECKPOINT)),
        help="checkpoint in the official layout (env OMNIGEN2_CHECKPOINT; default: the golden tiny model)",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="onnxruntime",
        help="onnxruntime (float32, golden parity), pytorch (see --precision, --device) or tensorrt (GPU)",
    )
    parser.add_argument("--precision", default="bf16", help="pytorch: fp32 or bf16; tensorrt: fp32, fp16 or bf16")
    parser.add_argument(
        "--device", choices=DEVICES, default="cpu", help="pytorch components and mllm: cpu, cuda or auto (CUDA if any)"
    )
    parser.add_argument(
        "--model-repository",
        type=Path,
        default=Path("model_repository"),
        help="where the Triton repository is generated: a new or empty folder, or one an earlier run built (a folder "
        "of other files is refused, not replaced)",
    )
    parser.add_argument(
        "--build-dir", type=Path, default=Path("build"), help="the ONNX export cache, Triton's log and backends"
    )
    parser.add_argument(
        "--triton-ports",
        type=Whole(1, 65_535),
        nargs=3,
        default=(8000, 8001, 8002),
        metavar=("HTTP", "GRPC", "METRICS"),
        help="Triton's ports, on loopback (1 to 65535)",
    )
    parser.add_argument(
        "--triton-restarts",
        type=Whole(0, why="0: exit on the first death"),
        default=3,
        help="restarts of a tritonserver that died unasked allowed within 10 minutes; one more death stops the stack "
        "with exit status 1, for its own supervisor (Kubernetes, systemd) to act on; 0 or more, 0: exit on the first",
    )
    parser.add_argument(
        "--http-listen",
        type=Address(optional=True),
        default=from_env("OMNIGEN2_HTTP_LISTEN", Address(optional=True), "127.0.0.1:8080"),
        help="the OpenAI-compatible HTTP API beside the gRPC one; '' turns it off (env OMNIGEN2_HTTP_LISTEN)",
    )
    add_bls_arguments(parser)
    add_step_cache_arguments(parser)
    add_safety_arguments(parser)
    add_fast_path_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    configure_logging()
    doing = "starting"
    triton: TritonServer | None = None
    try:
        # First: a stop while the flags are checked or torch is imported is one line and status 0 as well (before,
        # Python's default: exit 143 and no word). One during this module's imports was held (hold_stops, at the
        # top) and is raised here; only the interpreter's own start (about 25 ms) comes before.
        raise_on_stop()
        doing = "checking the settings"
        own = build_parser()
        args, frontend_args = own.parse_known_args(argv)
        # The rest must be the front end's: a mistyped flag is named by this parser, not by the front end's usage.
        _, unknown = FrontendConfig.parser(own.prog).parse_known_args(frontend_args)
        if unknown:
            own.error(
                f"unrecognized arguments: {' '.join(unknown)} (front-end flags: python -m serving.frontend.server "
                "--help)"
            )
        check_precision(args.backend, args.precision)
        install = find_install()  # refused at once, not after an ONNX export and an engine build
        if args.backend == "tensorrt":
            install.require_backend("tensorrt")
        # The exporter's chatter: onnx_ir per initializer, onnxscript per node (~150 INFO lines on a first start)
        for chatty in ("onnx_ir", "onnxscript"):
            logging.getLogger(chatty).setLevel(logging.WARNING)
        # and 4 warnings per graph that torchvision's ops are not registered: it is left out on purpose (pyproject)
        logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

        # Its limits also bound the BLS and the engine profiles.
        frontend = dataclasses.replace(FrontendConfig.from_args(frontend_args, own.prog), http_listen=args.http_listen)
        from serving.frontend.server import check_settings  # gRPC's import (1 s), not yet torch's

        check_settings(frontend)  # TLS, token and policy files and the warm-up's requests, before the build
        doing = "importing torch"
        _import_late()  # the settings are good: now torch, which a bad one above did not wait for
        fast = fast_from_args(args, args.build_dir)  # the fast path's flags against the device: torch resolves it
        doing = "checking the ports"
        # Ports another server holds are refused before the repository build, which can take minutes, not after it.
        triton_ports = Ports(*args.triton_ports)
        refuse_shared_ports(frontend, triton_ports)
        triton_ports.check_free()
        for flag, host, port in frontend.bound_addresses():
            if (error := bind_error(port, host)) is None:
                continue
            if error.errno == errno.EADDRINUSE:
                raise SettingError(flag, f"cannot listen on {host}:{port}: the port is in use (another front end?)")
            # A host not this machine's or not found: before, the front end's bind said so after Triton's start.
            raise SettingError(flag, f"cannot listen on {host}:{port}: {error.strerror}")
        doing = "building the model repository"
        with disk_errors_named(build_dir=args.build_dir, model_repository=args.model_repository):
            repository = prepare_repository(
                args.checkpoint,
                args.model_repository,
                args.backend,
                onnx_cache=args.build_dir / "onnx",
                precision=args.precision,
                bls=bls_from_args(args),
                device=args.device,
                limits=frontend.limits,
                safety=safety_from_args(args),
                fast=fast,
            )
            doing = "tritonserver was loading its models"
            triton = TritonServer(repository, triton_ports, build_dir=args.build_dir).start()
        doing = "the front end was starting"
        gave_up = run_front_end(triton, frontend, args)
    except Interrupted as stop:  # a stop asked for: exit status 0, as a stop while serving
        if triton is not None:
            triton.stop()  # started, then interrupted before the front end took it over
        log.warning("%s while %s: stopped; no tritonserver or stub left", stop.signal, doing)
        # The supervisor's own SIGTERM (Triton died too often) before the front end took the signals: still status 1.
        gave_up = triton.supervisor.gave_up if triton is not None and triton.supervisor is not None else None
        if gave_up is None:
            return
    finally:
        restore_stop_signals()  # for a caller in the same process (tests): Python's own handling again
    if gave_up is not None:
        sys.exit(f"serving.stack: {gave_up}")
    log.info("serving.stack stopped")


def run_front_end(triton: TritonServer, frontend: FrontendConfig, args: argparse.Namespace) -> str | None:
    """Serves until SIGTERM or SIGINT (or the supervisor gives up on Triton: its reason is returned), then stops
    Triton, however the front end ended."""
    # Giving up drains the front end as SIGTERM does (its callers get an answer), then the stack exits non-zero.
    supervisor = triton.supervise(lambda _: os.kill(os.getpid(), signal.SIGTERM), args.triton_restarts)
    try:
        config = dataclasses.replace(frontend, triton_url=triton.grpc_url)
        # The banner once health says SERVING (after the warm-up): callers earlier would be refused UNAVAILABLE. A
        # port in use stops the front end before either line, with one line instead.
        on_gpu = args.backend == "tensorrt" or resolve_device(args.device).type == "cuda"
        try:
            asyncio.run(
                serve(
                    config,
                    ready=lambda: print(warming_up(config), flush=True) if config.warmup else None,
                    serving=lambda: print(usage(config, triton, on_gpu), flush=True),
                    stopping=stop_on_repeat,  # from the front end's drain on: Triton's stop is not to be cut short
                )
            )
        finally:
            stop_on_repeat()  # a front end that failed to start: the event loop's handlers are gone with it
        log.info("stopping tritonserver")
    finally:
        triton.stop()
    log.info("tritonserver stopped")
    return supervisor.gave_up


def find_install() -> TritonInstall:
    """The Triton install, or one line saying why there is none."""
    try:
        return TritonInstall.find()
    except FileNotFoundError as exc:
        raise SettingError(TRITONSERVER_ENV if os.environ.get(TRITONSERVER_ENV) else "tritonserver", str(exc)) from exc


def refuse_shared_ports(frontend: FrontendConfig, triton: Ports) -> None:
    """Two of the stack's own listeners on one port: refused before the build, not found by a failed bind after
    Triton loaded its models (or by Triton's usage text for --triton-ports P P P)."""
    wildcards = ("", "0.0.0.0", "::", "[::]")
    triton_flags = [("--triton-ports HTTP", triton.http), ("--triton-ports GRPC", triton.grpc)]
    triton_flags.append(("--triton-ports METRICS", triton.metrics))
    listeners = [*frontend.bound_addresses(), *((flag, LOOPBACK, port) for flag, port in triton_flags)]
    for index, (flag, host, port) in enumerate(listeners):
        for other_flag, other_host, other_port in listeners[:index]:
            if port == other_port and (host == other_host or host in wildcards or other_host in wildcards):
                raise SettingError(flag, f"port {port} is also {other_flag}'s: each listener needs a port of its own")


def _import_late() -> None:
    """Bind LATE_IMPORTS' names here; one already bound (a test's stand-in build) is kept."""
    for module, names in LATE_IMPORTS.items():
        loaded = importlib.import_module(module)
        for name in names:
            globals().setdefault(name, getattr(loaded, name))


def __getattr__(name: str) -> Any:
    """`serving.stack.prepare_repository` and the other late names, from outside, before main binds them."""
    if any(name in names for names in LATE_IMPORTS.values()):
        _import_late()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def warming_up(config: FrontendConfig) -> str:
    return (
        f"OmniGen2 is up on {config.listen} and warming up (health NOT_SERVING until it ends, at most "
        f"{config.warmup_timeout_s:.0f} s; --no-warmup skips it) ..."
    )


def usage(config: FrontendConfig, triton: TritonServer, on_gpu: bool) -> str:
    metrics = f"http://{config.metrics_address}:{config.metrics_port}/metrics" if config.metrics_port else "off"
    # The commands as this stack takes them: with its TLS and, as a placeholder (never the token), its tokens.
    tls, tokens = bool(config.tls_cert), bool(config.auth_tokens)
    server = f"--server {config.listen}" + (f" --tls-ca {config.tls_cert}" if tls else "")
    server += ' --token "$TOKEN"' if tokens else ""
    # The CLI sends a token without TLS only to this machine; a listen address it cannot tell is local needs the
    # opt-out, said as such.
    cleartext = tokens and not tls and not on_this_machine(config.listen)
    server += " --allow-plaintext-token" if cleartext else ""
    http = f"{'https' if tls else 'http'}://{config.http_listen}/v1" if config.http_listen else "off"
    options = (f" --cacert {config.tls_cert}" if tls else "") + (' -H "Authorization: Bearer $TOKEN"' if tokens else "")
    curl = f"\n  curl -s{options} {http}/models" if config.http_listen else ""
    notes = ["TOKEN: a token whose digest --auth-tokens lists"] if tokens else []
    notes += ["a certificate from a public CA: --tls instead of --tls-ca, no --cacert"] if tls else []
    notes += ["--allow-plaintext-token: the token crosses the network readable (--tls-cert)"] if cleartext else []
    hints = "".join(f"\n  ({note})" for note in notes)
    # On a CPU the default 1024 x 1024 takes minutes even for the tiny model; the edit keeps its input's size.
    size = "" if on_gpu else " --width 128 --height 128"
    return f"""
OmniGen2 is serving (Ctrl-C stops it):
  API      {config.listen}  gRPC omnigen2.v1.OmniGen2, with health checking and reflection
  HTTP     {http}  OpenAI-compatible: /v1/images/generations, /v1/images/edits, /v1/chat/completions
  metrics  {metrics}
  Triton   {triton.grpc_url}  log: {triton.log_path}
Try:
  .venv/bin/omnigen2 {server} info
  .venv/bin/omnigen2 {server} generate "A red apple on a wooden table"{size} --steps 20 -o apple.png
  .venv/bin/omnigen2 {server} edit apple.png "Make the apple green" -o green.png{curl}{hints}
"""


if __name__ == "__main__":
    try:
        main()
    except OmniGen2Error as exc:  # a setting or a checkpoint to fix: one line, not a traceback
        sys.exit(f"serving.stack: {exc}")
