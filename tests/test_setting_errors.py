"""Every bad operator setting is refused at start in one line naming its flag (or environment variable) and the
value: before, zeros, negatives and NaN started silently, some values blamed another flag, and others died with
a traceback (KeyError, OverflowError, IsADirectoryError) or only after the model build. The parsers run in
process; a few subprocess runs check the exit status and that no traceback is printed."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from serving import stack
from serving.errors import SettingError
from serving.flag_types import Address, Number, Origins, Whole
from serving.frontend.auth import TokenRegistry, token_digest
from serving.frontend.config import FLAG_TYPES, FrontendConfig
from serving.frontend.server import check_settings
from tests.certificates import certificate

ROOT = Path(__file__).resolve().parents[1]

# (flag, value, what the one line says): each refused by argparse, exit status 2.
FRONTEND = [
    ("--max-in-flight", "0", "must be >= 1 (0)"),
    ("--max-in-flight", "-1", "must be >= 1 (-1)"),  # before: blamed --max-held-request-bytes
    ("--max-request-bytes", "0", "must be 1 to"),
    ("--max-request-bytes", "-5", "must be 1 to"),  # before: blamed --max-held-request-bytes
    ("--max-request-bytes", "99999999999999", "gRPC reads up to 2 x this in a C int"),  # before: OverflowError
    ("--max-response-bytes", "0", "must be 1 to"),
    ("--max-sample-tokens", "0", "must be >= 1 (0)"),
    ("--max-chat-tokens", "0", "must be >= 1 (0)"),
    ("--max-run-s", "0", "must be > 0 (0)"),
    ("--max-run-s", "nan", "must be a finite number (nan)"),
    ("--max-run-s", "inf", "must be a finite number (inf)"),
    ("--retry-after-s", "nan", "must be a finite number (nan)"),
    ("--retry-after-s", "-1", "must be >= 0"),
    ("--shutdown-grace-s", "-5", "must be >= 0"),
    ("--stop-grace-s", "nan", "must be a finite number (nan)"),
    ("--stream-write-timeout-s", "-1", "must be > 0 (-1)"),
    ("--warmup-timeout-s", "-1", "must be > 0 (-1)"),
    ("--health-interval-s", "0", "must be > 0 (0)"),
    ("--health-interval-s", "nan", "must be a finite number (nan)"),
    ("--http-idle-timeout-s", "0", "must be > 0 (0)"),
    ("--grpc-idle-timeout-s", "0", "must be > 0"),
    ("--grpc-max-connection-age-s", "0.5", "must be 0 or >= 1"),  # before: taken here, refused only in process
    ("--max-buffered-stream-bytes", "-1", "must be >= 1 (-1)"),
    ("--max-inflight-output-pixels", "-1", "must be >= 1 (-1)"),
    ("--worker-threads", "0", "must be >= 1 (0)"),  # before: ValueError from the thread pool
    ("--worker-threads", "-1", "must be >= 1 (-1)"),
    ("--metrics-port", "70000", "must be 0 to 65535"),  # before: OverflowError
    ("--http-listen", "127.0.0.1:notaport", "the port must be a whole number"),  # before: ValueError
    ("--listen", "nocolon", "not HOST:PORT (nocolon)"),
    ("--http-allowed-origins", "https://a.example,app.example", "not an origin like https://app.example (app.example)"),
    ("--max-in-flight", "abc", "not a whole number (abc)"),
    ("--limits", '{"max_steps": -1}', "max_steps must be > 0 (-1)"),
    ("--limits", '{"max_stepz": 5}', "unknown field max_stepz"),  # before: "invalid limits_from_json value"
    ("--limits", "{bad", "not JSON"),
    ("--limits", '{"max_steps": 100.5}', "max_steps must be a whole number (100.5)"),
]
# The stack's own flags, and the front end's through the stack (named by the stack's parser).
STACK = [
    ("--triton-restarts", "-1", "must be >= 0"),
    ("--max-call-tokens", "-5", "must be >= 0 (-5)"),
    ("--max-step-cache-mib", "-1", "must be >= 0"),
    ("--triton-ports", "0", "must be 1 to 65535 (0)"),
    ("--safety-thresholds", '{"NOPE": 2}', "unknown class 'NOPE'"),
    ("--safety-thresholds", '{"BUTTOCKS_EXPOSED": 2}', "a threshold is a score in [0, 1]"),
    ("--limits", '{"max_stepz": 5}', "unknown field max_stepz"),
    ("--max-in-flight", "0", "must be >= 1 (0)"),
    # Before: refused after torch's import, naming warmup_resolutions; and a build, then Triton's failed load.
    ("--warmup-resolutions", "bogus", "'bogus' is not WIDTHxHEIGHT"),
    ("--compile-cache-dir", "/proc/x", "cannot create the folder"),
    ("--sdpa-kernels", "cudnn,fast", "'fast': not one of cudnn, flash, efficient, math (cudnn,fast)"),
    ("--sdpa-kernels", "flash,cudnn,flash", "flash named twice"),
    ("--padded-attention", "split", "invalid choice: 'split' (choose from 'folded', 'bias')"),
]


def _refused(parse: object, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        parse(argv)  # type: ignore[operator]
    assert exited.value.code == 2
    return capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize(("flag", "value", "says"), FRONTEND)
def test_a_bad_front_end_value_is_refused_naming_its_flag(
    flag: str, value: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _refused(FrontendConfig.parser().parse_args, [flag, value], capsys)
    assert line.startswith(f"python -m serving.frontend.server: error: argument {flag}: ")
    assert says in line


@pytest.mark.parametrize(("flag", "value", "says"), STACK)
def test_a_bad_stack_value_is_refused_by_the_stacks_parser(
    flag: str, value: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [flag, *([value] * 3 if flag == "--triton-ports" else [value])]
    line = _refused(stack.main, argv, capsys)
    assert line.startswith(f"python -m serving.stack: error: argument {flag}: ")  # not the front end's prog
    assert says in line


@pytest.mark.parametrize(
    ("env", "value", "says"),
    [
        ("OMNIGEN2_MAX_IN_FLIGHT", "abc", "not a whole number (abc)"),
        ("OMNIGEN2_MAX_RUN_S", "nan", "must be a finite number (nan)"),
        ("OMNIGEN2_METRICS_PORT", "70000", "must be 0 to 65535"),
        ("OMNIGEN2_LIMITS", "{bad", "not JSON"),
    ],
)
def test_a_bad_environment_value_names_the_variable(
    env: str, value: str, says: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingError) as refused:
        FrontendConfig.parser()
    assert refused.value.setting == env and says in refused.value.description


def test_a_whole_limit_written_as_a_float_is_kept_as_an_int() -> None:
    # Before: 100.0 passed the whole-number check but stayed a float, and GetModelInfo's conversion raised TypeError.
    limits = FrontendConfig.from_args(["--limits", '{"max_steps": 100.0, "max_guidance": 20}']).limits
    assert (limits.max_steps, type(limits.max_steps)) == (100, int)
    assert (limits.max_guidance, type(limits.max_guidance)) == (20.0, float)


def test_every_numeric_or_address_flag_has_a_checked_type() -> None:
    defaults = FrontendConfig()
    checked = {f.name for f in fields(FrontendConfig) if type(getattr(defaults, f.name)) in (int, float)}
    assert checked <= set(FLAG_TYPES)
    assert {"listen", "triton_url", "http_listen"} <= set(FLAG_TYPES)


def _out_of_bounds(kind: Whole | Number | Address | Origins) -> object:
    if isinstance(kind, Address):
        return "nocolon"
    if isinstance(kind, Origins):
        return "app.example"
    return kind.low - 1 if isinstance(kind, Whole) else float("nan")


@pytest.mark.parametrize("name", sorted(FLAG_TYPES))
def test_a_config_built_in_process_is_checked_as_its_flag_is(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    # Before: only six fields were checked in process, each by a copy of its bounds; the others took any value.
    flag, value = f"--{name.replace('_', '-')}", _out_of_bounds(FLAG_TYPES[name])
    with pytest.raises(SettingError) as refused:
        FrontendConfig(**{name: value})  # type: ignore[arg-type]
    parsed = _refused(FrontendConfig.parser().parse_args, [flag, str(value)], capsys)
    assert parsed.endswith(f"argument {refused.value}")  # the flag's own line, word for word


def test_a_config_built_in_process_takes_only_its_fields_types() -> None:
    with pytest.raises(SettingError, match=r"^--max-in-flight: not a whole number \(2\.5\)$"):
        FrontendConfig(max_in_flight=2.5)  # type: ignore[arg-type]
    with pytest.raises(SettingError, match=r"^--max-run-s: not a number \(True\)$"):
        FrontendConfig(max_run_s=True)
    assert FrontendConfig(max_run_s=5).max_run_s == 5  # an int for seconds is a number


def test_a_held_request_budget_below_one_request_is_refused_with_the_settings() -> None:
    # Before: refused only as the front end made its read gate, which `make serve` does after Triton's start.
    with pytest.raises(SettingError, match=r"^--max-held-request-bytes: must be at least 2 x --max-request-bytes"):
        FrontendConfig.from_args(["--max-held-request-bytes", "100"])


def test_zero_keeps_its_documented_meaning() -> None:
    config = FrontendConfig.from_args(
        ["--metrics-port", "0", "--max-held-request-bytes", "0", "--http-max-connections", "0", "--stop-grace-s", "0"]
    )
    assert (config.metrics_port, config.max_held_request_bytes, config.http_max_connections) == (0, 0, 0)
    assert config.stop_grace_s == 0


@pytest.mark.parametrize(("precision", "says"), [("fp8", "not implemented yet"), ("fp7", "pytorch takes fp32 or bf16")])
def test_a_precision_the_backend_lacks_is_refused_with_the_allowed_ones(precision: str, says: str) -> None:
    with pytest.raises(SettingError) as refused:  # before: KeyError in fast_from_args
        stack.main(["--backend", "pytorch", "--precision", precision])
    assert refused.value.setting == "--precision"
    assert says in refused.value.description and f"({precision})" in refused.value.description


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--precision", "fp32", "--attention", "sdpa"], "folded needs --precision bf16 on cuda"),
        (["--precision", "bf16", "--sdpa-kernels", "efficient"], "folded needs cudnn or flash in --sdpa-kernels"),
    ],
    ids=["fp32", "no-fused-kernel"],
)
def test_the_stack_refuses_folded_padding_that_no_fused_cuda_kernel_takes(
    flags: list[str], says: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: taken, and on a GPU each padded call then ran SDPA's math kernel (float32 scores: 11.6 GB for the CFG
    # pair at 8320 tokens) or failed with "No available kernel". The device is CUDA as far as the flags know.
    import torch

    from serving.artifacts import repository

    monkeypatch.setattr(repository, "resolve_device", lambda name: torch.device("cuda"))
    argv = ["--http-listen=", "--metrics-port=0", "--backend", "pytorch", "--device", "cuda", *flags]
    with pytest.raises(SettingError) as refused:
        stack.main([*argv, "--padded-attention", "folded"])
    assert refused.value.setting == "--padded-attention" and says in refused.value.description


def test_tls_files_are_checked_naming_the_flag(tmp_path: Path) -> None:
    cert, key = (str(path) for path in certificate(tmp_path, "a"))
    other_key = str(certificate(tmp_path, "b")[1])
    check_settings(FrontendConfig(tls_cert=cert, tls_key=key))
    cases = [
        ((cert, ""), "--tls-key", "is needed with --tls-cert"),  # before: IsADirectoryError
        (("", key), "--tls-cert", "is needed with --tls-key"),
        ((key, cert), "--tls-cert", "not a PEM certificate"),  # before: "--listen: ... port in use"
        ((str(tmp_path / "missing.crt"), key), "--tls-cert", "No such file"),  # before: FileNotFoundError
        ((cert, other_key), "--tls-key", "not the private key of --tls-cert"),
    ]
    for (tls_cert, tls_key), flag, says in cases:
        with pytest.raises(SettingError) as refused:
            check_settings(FrontendConfig(tls_cert=tls_cert, tls_key=tls_key))
        assert refused.value.setting == flag and says in refused.value.description, (tls_cert, tls_key)


def test_a_token_file_anyone_may_write_or_with_no_token_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tokens": [{"name": "t", "sha256": token_digest("secret")}]}))
    os.chmod(path, 0o646)
    with pytest.raises(SettingError, match=r"--auth-tokens: anyone may write it"):
        TokenRegistry.from_file(path)
    os.chmod(path, 0o600)
    assert TokenRegistry.from_file(path).policies
    path.write_text(json.dumps({"tokens": []}))
    with pytest.raises(SettingError, match=r"--auth-tokens: no token: every call would be refused"):
        TokenRegistry.from_file(path)


@pytest.mark.parametrize(
    ("policy", "flags", "says"),
    [
        (None, ["--policy=/nowhere/policy.json"], r"^--policy: /nowhere/policy\.json: .*No such file"),
        ('{"rules": [{"id": "a"}]}', [], r"^--policy: rule 'a': needs `terms` or `regexes`"),
        ("[" * 100_000, [], r"^--policy: .*: maximum recursion depth"),  # before: a RecursionError traceback
        (None, ["--warmup-steps=100000"], r"^--warmup-size/--warmup-steps: the warm-up's requests are refused"),
    ],
    ids=["missing-policy", "bad-rule", "policy-too-deep", "warm-up-refused"],
)
def test_the_stack_refuses_a_bad_front_end_setting_before_torch_and_the_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, policy: str | None, flags: list[str], says: str
) -> None:
    # Before: checked as the front end started, after the model repository's build and Triton's start.
    if policy is not None:
        (tmp_path / "policy.json").write_text(policy)
        flags = [f"--policy={tmp_path / 'policy.json'}"]
    monkeypatch.setattr(stack, "_import_late", lambda: pytest.fail("torch imported before the refusal"))
    with pytest.raises(SettingError, match=says):
        stack.main(["--http-listen=", "--metrics-port=0", *flags])


@pytest.mark.parametrize(
    ("argv", "status", "says"),
    [
        (["--max-in-flight", "0"], 2, "argument --max-in-flight: must be >= 1 (0)"),
        (["--backend", "pytorch", "--precision", "fp8"], 1, "serving.stack: --precision: "),
        # Before the ports and the build: the kernel order picks among CUDA's kernels, and --device is cpu
        (["--backend", "pytorch", "--sdpa-kernels", "cudnn,flash"], 1, "serving.stack: --sdpa-kernels: orders SDPA's"),
        # --device cpu's attention is dense, which takes no folded padding
        (["--backend", "pytorch", "--padded-attention", "folded"], 1, "padded_attention: folded is for --attention"),
        (["--tls-cert", "/"], 1, "serving.stack: --tls-key: is needed with --tls-cert (/)"),
    ],
)
def test_the_stack_exits_with_one_line_and_no_traceback(argv: list[str], status: int, says: str) -> None:
    env = {**os.environ, "OMNIGEN2_METRICS_PORT": "0", "OMNIGEN2_HTTP_LISTEN": ""}  # no port of another test's
    done = subprocess.run(
        [sys.executable, "-m", "serving.stack", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == status
    assert "Traceback" not in done.stderr
    assert says in done.stderr.splitlines()[-1]


def test_the_stacks_flags_are_checked_before_torch_is_imported() -> None:
    # Before: every flag error waited for torch's import (6-11 s); a bad front-end value is refused the same way.
    probe = (
        "import sys, serving.stack\n"
        "try:\n    serving.stack.main(['--max-in-flight', '0'])\n"
        "except SystemExit:\n    print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr


def test_thresholds_without_safety_are_checked_and_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    from serving.artifacts.repository import safety_from_args

    with caplog.at_level(logging.WARNING):
        off = safety_from_args(argparse.Namespace(safety=False, safety_thresholds='{"BELLY_EXPOSED": 0.8}'))
    assert off is None
    assert "--safety-thresholds does nothing without --safety" in caplog.text


def test_fast_path_flags_for_another_backend_are_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    """Before: `--sdpa-kernels cudnn --backend onnxruntime` was dropped without a word."""
    from serving.artifacts.repository import FAST_PATH_SWITCHES, fast_from_args
    from serving.command_flags import add_fast_path_arguments

    place = {"compile_cache_dir": Path("build/torch-compile")}  # the GPU overlay passes it to every backend: no warning
    flags = dict.fromkeys(FAST_PATH_SWITCHES) | {"sdpa_kernels": ("cudnn",), "compile": False} | place
    with caplog.at_level(logging.WARNING):
        fast = fast_from_args(argparse.Namespace(backend="onnxruntime", **flags), Path("build"))
    assert fast is None
    assert "--compile, --sdpa-kernels: not used with --backend onnxruntime" in caplog.text
    assert "compile-cache-dir" not in caplog.text
    parser = argparse.ArgumentParser()
    add_fast_path_arguments(parser)  # every flag of the group is in the list the warning reads
    assert {action.dest for action in parser._actions} - {"help"} == {*FAST_PATH_SWITCHES, "compile_cache_dir"}


def test_the_front_end_exits_with_one_line_naming_the_variable() -> None:
    env = {**os.environ, "OMNIGEN2_MAX_IN_FLIGHT": "abc"}
    done = subprocess.run(
        [sys.executable, "-m", "serving.frontend.server"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == "serving.frontend: OMNIGEN2_MAX_IN_FLIGHT: not a whole number (abc)"
