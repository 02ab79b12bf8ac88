"""deploy/: the Kubernetes manifests render with `kubectl kustomize` and every object validates against the
Kubernetes schema; the pod, Services, budget, policy and autoscaler say what the scale-out design needs; the
Dockerfiles and the compose file (never built here: no Docker engine) pin their bases, run unprivileged, expose
their ports and check health over gRPC; and the front end's install leaves the model libraries out."""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement

from serving.artifacts import repository
from serving.frontend.config import FrontendConfig
from serving.frontend.health import LIVENESS, SERVICE
from serving.frontend.metrics import WARMUP_OUTCOMES, Metrics
from serving.frontend.server import ENDING_MARGIN_S
from serving.pipeline.cost import generation_cost
from serving.pipeline.request import GenerationRequest
from serving.triton.bls_settings import BlsSettings
from serving.triton.install import TRITONSERVER_ENV
from serving.triton.launcher import MMAP_THRESHOLD, MMAP_THRESHOLD_ENV, NO_RESPONSE_POOL, STUB_MMAP_THRESHOLD
from serving.triton.memory import STUB_MMAP_THRESHOLD_ENV
from serving.triton.ports import free_port
from tests.certificates import certificate
from tests.test_triton_install import fake_install

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
KUBERNETES = "1.37.0"  # the newest schema kubernetes-validate ships
KUSTOMIZATIONS = ("base", "overlays/gpu", "overlays/s3", "overlays/production")
# Custom resources the schema does not know: checked by their own tests below.
CUSTOM_KINDS = {"PrometheusRule"}
# Imported only because they are installed here: grpc looks for grpcio-tools, setuptools has a start-up hook, aiohttp
# uses brotli when it finds it.
OPTIONAL = {"grpcio-tools", "setuptools", "brotli"}
HEAVY = {"torch", "transformers", "diffusers", "accelerate", "onnxruntime", "onnx", "nvidia-pytriton", "tensorrt"}


def render(kustomization: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with Kustomize) renders deploy/k8s; install it to run this test"
    out = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / "k8s" / kustomization)], capture_output=True, text=True, check=True
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def container(pod: dict[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    return next(c for c in pod["initContainers" if init else "containers"] if c["name"] == name)


def env(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in c.get("env", [])}


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return render("base")


@pytest.fixture(scope="module")
def pod(base: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = by_kind(base, "Deployment")
    return dict(deployment["spec"]["template"]["spec"])


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_rendered_object_validates(kustomization: str) -> None:
    objects = render(kustomization)
    assert objects
    for obj in objects:  # strict: an unknown field is an error, not ignored
        if obj["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(obj, KUBERNETES, strict=True)


def test_triton_and_the_front_end_share_a_pod_over_loopback(pod: dict[str, Any]) -> None:
    assert [c["name"] for c in pod["containers"]] == ["triton", "frontend"]
    assert "--triton-url=127.0.0.1:8001" in container(pod, "frontend")["args"]
    triton = container(pod, "triton")["command"]
    assert "--http-address=127.0.0.1" in triton and "--grpc-port=8001" in triton
    # Triton's gRPC (explicit model control: load/unload) is on loopback too, and no port of it is declared.
    assert "--grpc-address=127.0.0.1" in triton
    assert [p["name"] for p in container(pod, "triton")["ports"]] == ["triton-metrics"]
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_probes_use_the_grpc_health_service(pod: dict[str, Any]) -> None:
    frontend, triton = container(pod, "frontend"), container(pod, "triton")
    assert frontend["readinessProbe"]["grpc"] == {"port": 50051, "service": SERVICE}  # follows Triton and the drain
    assert frontend["livenessProbe"]["grpc"] == {"port": 50051, "service": LIVENESS}  # the front end itself
    # Triton listens on loopback only: its probes run in its container. Liveness also looks for each Python model's
    # stub process: Triton keeps a model whose stub died READY (serving/triton/stub_probe.py), and the command is
    # tritonserver itself, with no watchdog to reload it.
    startup, liveness = triton["startupProbe"]["exec"]["command"], triton["livenessProbe"]["exec"]["command"]
    assert startup == ["python3", "-m", "serving.health_probe", "--address=127.0.0.1:8001"]
    assert liveness == ["python3", "-m", "serving.triton.stub_probe", "--address=127.0.0.1:8001"]
    assert triton["command"][0] == "tritonserver"  # the process the probe finds by name
    address = f"{flag(triton['command'], '--grpc-address')}:{flag(triton['command'], '--grpc-port')}"
    assert flag(startup, "--address") == flag(liveness, "--address") == address


@pytest.mark.parametrize("kustomization", ["base", "overlays/gpu"])
def test_termination_outlasts_the_longest_call(kustomization: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The drain covers a call admitted just before SIGTERM (--max-run-s, then its reply at the write timeout), Triton
    outlives the front end, and the pod's grace covers both: a long call is not cut by a rollout."""
    (deployment,) = by_kind(render(kustomization), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    frontend, triton = container(pod, "frontend"), container(pod, "triton")
    config = frontend_config(frontend, monkeypatch)
    assert config.shutdown_grace_s >= config.max_run_s + config.stream_write_timeout_s
    front_prestop = int(frontend["lifecycle"]["preStop"]["exec"]["command"][1])
    # The stop's longest: preStop, the drain, a cut call's stop grace and the handlers' margin (server.py).
    front_stop = front_prestop + config.shutdown_grace_s + config.stop_grace_s + ENDING_MARGIN_S
    # Triton's preStop waits while the front end's metrics port answers: it closes only when that process exits.
    script = triton["lifecycle"]["preStop"]["exec"]["command"][2]
    assert f'("127.0.0.1", {config.metrics_port})' in script and "except OSError" in script
    assert {"containerPort": config.metrics_port, "name": "metrics"} in frontend["ports"]
    exit_timeout = int(flag(triton["command"], "--exit-timeout-secs"))
    assert pod["terminationGracePeriodSeconds"] >= front_stop + exit_timeout


def test_triton_waits_for_the_front_end_to_exit(pod: dict[str, Any]) -> None:
    """The preStop script, run here: it returns at once when nothing listens, and waits while something does."""
    script = container(pod, "triton")["lifecycle"]["preStop"]["exec"]["command"]
    port = free_port()
    code = script[2].replace("9464", str(port))
    assert subprocess.run([sys.executable, "-c", code], timeout=30).returncode == 0  # nothing listens: at once
    with socket.create_server(("127.0.0.1", port)) as listener:
        listener.listen(16)
        waiting = subprocess.Popen([sys.executable, "-c", code])
        try:
            with pytest.raises(subprocess.TimeoutExpired):
                waiting.wait(timeout=1.5)  # the front end is up: Triton keeps serving (checks every 1 s)
        finally:
            listener.close()
        assert waiting.wait(timeout=30) == 0  # gone: Triton may stop


def test_services_budget_and_network_policy(base: list[dict[str, Any]], pod: dict[str, Any]) -> None:
    services = {s["metadata"]["name"]: s["spec"] for s in by_kind(base, "Service")}
    assert services["omnigen2-headless"]["clusterIP"] == "None"
    assert services["omnigen2"]["type"] == "ClusterIP"
    for spec in services.values():  # the gRPC API and the OpenAI-compatible HTTP API
        assert [(p["port"], p["targetPort"]) for p in spec["ports"]] == [(50051, "api"), (8080, "http")]
    labels = base[0]["metadata"]["labels"]
    (pdb,) = by_kind(base, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    (policy,) = by_kind(base, "NetworkPolicy")
    open_to_all = [rule for rule in policy["spec"]["ingress"] if "from" not in rule]
    assert [p["port"] for rule in open_to_all for p in rule["ports"]] == ["api", "http"]
    named = {p["name"] for c in pod["containers"] for p in c.get("ports", [])}
    assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} <= named
    for selector in (pdb["spec"]["selector"], policy["spec"]["podSelector"]):
        assert selector["matchLabels"].items() <= {**pod_labels(base), **labels}.items()


def pod_labels(objects: list[dict[str, Any]]) -> dict[str, str]:
    (deployment,) = by_kind(objects, "Deployment")
    return dict(deployment["spec"]["template"]["metadata"]["labels"])


def adapter_rules() -> list[dict[str, Any]]:
    """The prometheus-adapter chart's values: rules added to its defaults (`custom`), never replacing them."""
    values = yaml.safe_load((DEPLOY / "k8s" / "prometheus-adapter-values.yaml").read_text())["rules"]
    assert values["default"] is True and "existing" not in values
    return list(values["custom"])


def test_autoscaler_reads_queue_time_and_in_flight_through_the_adapter(base: list[dict[str, Any]]) -> None:
    (hpa,) = by_kind(base, "HorizontalPodAutoscaler")
    assert not by_kind(base, "ConfigMap")  # the adapter's config lives in its own namespace: Helm values, not here
    served = {rule["name"]["as"]: rule for rule in adapter_rules()}
    wanted = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    assert wanted <= served.keys()
    assert "nv_inference_queue_duration_us" in served["omnigen2_queue_seconds"]["metricsQuery"]
    in_flight = Metrics().in_flight._name  # the front end's own gauge, as it exports it
    assert in_flight in served["omnigen2_in_flight_requests"]["seriesQuery"]
    # The adapter asks for many pods at once and maps each series back to its pod by the GroupBy labels: every
    # query's outermost aggregation keeps them.
    for rule in served.values():
        assert rule["metricsQuery"].startswith("sum by (<<.GroupBy>>) ("), rule["name"]["as"]


def test_gpu_overlay_asks_for_a_gpu_and_builds_engines() -> None:
    objects = render("overlays/gpu")
    (deployment,) = by_kind(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    for c in (container(pod, "triton"), container(pod, "prepare-repository", init=True)):
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    prepare = container(pod, "prepare-repository", init=True)
    assert env(prepare)["OMNIGEN2_BACKEND"] == "tensorrt"
    # The repository lands under the working directory, on the volume Triton serves it from (engines: below).
    assert {"name": "models", "mountPath": prepare["workingDir"]} in prepare["volumeMounts"]
    assert env(container(pod, "triton"))["MODEL_REPOSITORY"] == flag(prepare["command"], "--out")


def test_gpu_pods_share_one_build_cache(pod: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    """The ONNX export, engines and the compile cache go to one ReadWriteMany claim, mounted read-write by the init
    container (which builds them) and by Triton (the `pytorch` backend compiles at load) at the paths the generator's
    flags name. The CPU base builds none of them there and keeps no such claim."""
    objects = render("overlays/gpu")
    (claim,) = [c for c in by_kind(objects, "PersistentVolumeClaim") if c["metadata"]["name"] == "omnigen2-build-cache"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    (deployment,) = by_kind(objects, "Deployment")
    gpu_pod = deployment["spec"]["template"]["spec"]
    shared = {"claimName": "omnigen2-build-cache"}
    (volume,) = [v["name"] for v in gpu_pod["volumes"] if v.get("persistentVolumeClaim") == shared]
    prepare, triton = container(gpu_pod, "prepare-repository", init=True), container(gpu_pod, "triton")
    mounts = [[m for m in c["volumeMounts"] if m["name"] == volume] for c in (prepare, triton)]
    assert [len(m) for m in mounts] == [1, 1] and not any(m.get("readOnly") for (m,) in mounts)
    (root,) = {m["mountPath"] for (m,) in mounts}
    for name in ("--onnx-cache", "--engines", "--compile-cache-dir"):
        assert flag(prepare["command"], name).startswith(f"{root}/"), name
    with pytest.raises(SystemExit) as exited:  # its own parser, in this process (an interpreter of its own: 3-7 s)
        repository.main(["--help"])
    usage = capsys.readouterr().out
    assert exited.value.code == 0
    assert "--engines" in usage and "--compile-cache-dir" in usage  # flags the generator takes
    assert "omnigen2-build-cache" not in json.dumps(pod)
    assert not flag(container(pod, "prepare-repository", init=True)["command"], "--onnx-cache").startswith(root)


def test_s3_overlay_lets_triton_read_the_repository() -> None:
    objects = render("overlays/s3")
    (deployment,) = by_kind(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert env(container(pod, "triton"))["MODEL_REPOSITORY"].startswith("s3://")
    assert not pod.get("initContainers") and not by_kind(objects, "PersistentVolumeClaim")


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / name).read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


@pytest.mark.parametrize(
    ("name", "base_image", "ports"),
    [
        ("frontend.Dockerfile", r"python:3\.11\.\d+-slim-\w+", {"50051", "8080", "9464"}),
        ("triton.Dockerfile", r"nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3", {"8000", "8001", "8002"}),
    ],
)
def test_dockerfiles(name: str, base_image: str, ports: set[str]) -> None:
    steps = dockerfile(name)
    bases = [args.split()[0] for kind, args in steps if kind == "FROM"]
    assert bases and all(re.fullmatch(base_image, image) for image in bases)  # pinned by tag, never latest
    users = [args for kind, args in steps if kind == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert {p for kind, args in steps if kind == "EXPOSE" for p in args.split()} == ports
    (healthcheck,) = [args for kind, args in steps if kind == "HEALTHCHECK"]
    # Triton's image also looks for its Python models' stubs (serving/triton/stub_probe.py).
    assert ("serving.triton.stub_probe" if name == "triton.Dockerfile" else "serving.health_probe") in healthcheck


def test_the_front_end_image_installs_no_model_library() -> None:
    installs = [args for kind, args in dockerfile("frontend.Dockerfile") if kind == "RUN" and "pip install" in args]
    assert installs and all("[" not in args for args in installs)  # the plain install: no extras
    triton = [args for kind, args in dockerfile("triton.Dockerfile") if kind == "RUN" and "pip install" in args]
    assert any("'.[model]'" in args for args in triton)


def test_the_front_ends_install_covers_what_it_imports_and_no_model_library() -> None:
    """What `pip install ./client .` brings (the project's plain dependencies and the SDK's, with theirs) is every
    distribution the front end imports, and none of the model libraries."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    sdk = tomllib.loads((REPO / "client" / "pyproject.toml").read_text())["project"]
    closure = _closure([Requirement(r) for r in project["dependencies"] + sdk["dependencies"]])
    assert not closure & HEAVY, closure & HEAVY
    probe = "import sys, serving.frontend.server; print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    modules = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    owners = metadata.packages_distributions()
    imported = {_norm(d) for m in modules for d in owners.get(m, [])} - {"omnigen2-serving", "omnigen2-client"}
    missing = imported - closure - OPTIONAL
    assert not missing, missing


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(requirements: list[Requirement]) -> set[str]:
    seen: set[str] = set()
    todo = [(r, frozenset(r.extras)) for r in requirements]
    while todo:
        requirement, extras = todo.pop()
        name = _norm(requirement.name)
        key = f"{name}[{','.join(sorted(extras))}]"
        if key in seen:
            continue
        seen.add(key)
        for line in metadata.requires(requirement.name) or []:
            child = Requirement(line)
            environments = [{"extra": e} for e in extras] or [{"extra": ""}]
            if child.marker is None or any(child.marker.evaluate(e) for e in environments):
                todo.append((child, frozenset(child.extras)))
    return {key.split("[")[0] for key in seen}


def flag(command: list[str], name: str) -> str:
    (value,) = [arg.split("=", 1)[1] for arg in command if arg.startswith(f"{name}=")]
    return value


def test_the_triton_image_serves_what_the_gpu_prepare_step_builds() -> None:
    """compose.gpu.yaml generates the `tensorrt` repository on a GPU (engines and ONNX cache under /models/build, on
    the kept `models` volume); the image's CMD serves that repository."""
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    gpu = yaml.safe_load((DEPLOY / "compose.gpu.yaml").read_text())["services"]
    prepare = gpu["prepare"]["command"]
    assert prepare[:3] == ["python3", "-m", "serving.artifacts.repository"] and flag(prepare, "--backend") == "tensorrt"
    for name in ("prepare", "triton"):
        (device,) = gpu[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"]
    assert services["prepare"]["working_dir"] == "/models" and "models:/models" in services["prepare"]["volumes"]
    (cmd,) = [args for kind, args in dockerfile("triton.Dockerfile") if kind == "CMD"]
    assert f"--model-repository={flag(prepare, '--out')}" in json.loads(cmd)


@pytest.mark.parametrize("backends", [("tensorrt",), ()])
def test_the_triton_image_build_fails_without_a_tensorrt_backend(tmp_path: Path, backends: tuple[str, ...]) -> None:
    """The image's build runs the launcher's own check against its Triton: run here against a fake install in
    Triton's layout, with and without the backend."""
    (check,) = [
        code
        for kind, args in dockerfile("triton.Dockerfile")
        if kind == "RUN"
        for code in re.findall(r'python3 -c "([^"]+)"', args)
        if "require_backend" in code
    ]
    environ = os.environ | {TRITONSERVER_ENV: str(fake_install(tmp_path / "opt-tritonserver", backends))}
    done = subprocess.run([sys.executable, "-c", check], cwd=REPO, env=environ, capture_output=True, text=True)
    assert (done.returncode == 0) == bool(backends), done.stderr


def _seconds(text: str) -> float:
    return float(text.removesuffix("s"))


def test_the_front_ends_health_checks_wait_for_its_warm_up(pod: dict[str, Any]) -> None:
    """NOT_SERVING for up to --warmup-timeout-s once Triton is ready: Docker's start period covers it (it was 20 s).
    In the pod nothing restarts the front end meanwhile: its liveness is the `liveness` service (SERVING whatever
    Triton and the warm-up do), and its readiness only keeps it out of the Services."""
    warm_up = FrontendConfig().warmup_timeout_s
    (healthcheck,) = [args for kind, args in dockerfile("frontend.Dockerfile") if kind == "HEALTHCHECK"]
    start_period = re.search(r"--start-period=(\S+)", healthcheck)
    assert start_period and _seconds(start_period.group(1)) > warm_up
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["frontend"]["healthcheck"]
    assert _seconds(compose["start_period"]) > warm_up
    frontend = container(pod, "frontend")
    assert "startupProbe" not in frontend and frontend["livenessProbe"]["grpc"]["service"] == LIVENESS


def test_compose_runs_the_pair_over_loopback() -> None:
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    assert services["frontend"]["network_mode"] == "service:triton"  # one network namespace, as in a pod
    assert services["frontend"]["depends_on"]["triton"]["condition"] == "service_healthy"
    assert services["triton"]["depends_on"]["prepare"]["condition"] == "service_completed_successfully"
    assert "serving.artifacts.repository" in services["prepare"]["command"]
    assert "serving.triton.stub_probe" in services["triton"]["healthcheck"]["test"]
    assert "serving.health_probe" in services["frontend"]["healthcheck"]["test"]
    assert {"50051:50051"} <= set(services["triton"]["ports"])


def test_the_front_ends_metrics_have_a_scrape_job(base: list[dict[str, Any]], pod: dict[str, Any]) -> None:
    """The pod's annotations send the kubernetes-pods job to Triton's port only; the front end's in-flight gauge (the
    HPA's main signal) needs the job in prometheus-scrape-frontend.yaml, with the labels the adapter's rules key on."""
    annotations = pod_annotations(base)
    assert annotations["prometheus.io/port"] == "8002"
    (job,) = yaml.safe_load((DEPLOY / "k8s" / "prometheus-scrape-frontend.yaml").read_text())
    (keep,) = [r for r in job["relabel_configs"] if r.get("action") == "keep"]
    assert keep["source_labels"][-1] == "__meta_kubernetes_pod_container_port_name"
    app, port_name = keep["regex"].split(";")
    assert app == base[0]["metadata"]["labels"]["app.kubernetes.io/name"]
    assert {"containerPort": 9464, "name": port_name} in container(pod, "frontend")["ports"]
    assert {r.get("target_label") for r in job["relabel_configs"]} >= {"namespace", "pod"}
    in_flight = Metrics().in_flight._name
    (rule,) = [r for r in adapter_rules() if in_flight in r["seriesQuery"]]
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def pod_annotations(objects: list[dict[str, Any]]) -> dict[str, str]:
    (deployment,) = by_kind(objects, "Deployment")
    return dict(deployment["spec"]["template"]["metadata"]["annotations"])


MEMORY_ENV = {MMAP_THRESHOLD_ENV: str(MMAP_THRESHOLD), STUB_MMAP_THRESHOLD_ENV: str(STUB_MMAP_THRESHOLD)}


def test_deployed_triton_gives_memory_back_as_make_serve_does(pod: dict[str, Any]) -> None:
    """The images and the pod start tritonserver themselves, not through the launcher: they carry its memory
    settings (docs/reliability.md, memory after large outputs), or large answers' memory stays held there."""
    triton = container(pod, "triton")
    assert NO_RESPONSE_POOL in triton["command"] and MEMORY_ENV.items() <= env(triton).items()
    steps = dockerfile("triton.Dockerfile")
    (cmd,) = [json.loads(args) for kind, args in steps if kind == "CMD"]
    assert cmd[0] == "tritonserver" and NO_RESPONSE_POOL in cmd
    declared = dict(pair.split("=", 1) for kind, args in steps if kind == "ENV" for pair in args.split())
    assert MEMORY_ENV.items() <= declared.items()


GiB, MiB = 1024**3, 1024**2
UNITS = {"Ki": 1024, "Mi": MiB, "Gi": GiB, "Ti": 1024 * GiB}
# Measured bounds the pod's memory limits are built from (the deployment's comments cite them):
READ_PEAK = 5  # front end memory per held request byte at worst, 4.5-5x (docs/api.md, --max-held-request-bytes)
BYTES_PER_OUTPUT_PIXEL = 65  # every process's own peak summed (docs/reliability.md, output flood)
BYTES_PER_TOKEN_SQUARED = 35  # attention of one sample (docs/reliability.md, token budgets)
VAE_DECODER_PEAK = 1_200_000_000  # its 1024-px tiles (docs/reliability.md)
BYTES_PER_INPUT_PIXEL = 16  # decoded in the BLS: an estimate, NOT measured (deployment.yaml)
FRONT_END_PROCESS = 512 * MiB  # the process itself: 0.07 GiB after cpu-full-smoke's requests
FULL_SMOKE = REPO / "benchmarks" / "results" / "cpu-full-smoke"
FULL_SMOKE_EDIT = "Make the apple green"  # benchmarks/full_smoke.py's edit, 256x256 of a 256x256 image


def quantity(text: str) -> int:
    """A Kubernetes memory quantity in bytes (the binary suffixes the manifests use, or plain bytes)."""
    for suffix, factor in UNITS.items():
        if text.endswith(suffix):
            return int(text.removesuffix(suffix)) * factor
    return int(text)


def frontend_config(frontend: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> FrontendConfig:
    """The front end's settings as the pod gives them: its args, and its OMNIGEN2_* environment, each of which must
    name a flag (an unknown variable would be ignored silently)."""
    names = {f.upper() for f in vars(FrontendConfig())}
    for name, value in env(frontend).items():
        if name.startswith("OMNIGEN2_") and value:
            assert name.removeprefix("OMNIGEN2_") in names, f"{name} is no front-end flag"
            monkeypatch.setenv(name, value)
    return FrontendConfig.from_args(frontend["args"])


def test_the_front_ends_memory_limit_holds_its_budgets_worst_case(
    pod: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    frontend = container(pod, "frontend")
    config = frontend_config(frontend, monkeypatch)
    assert config.max_held_request_bytes  # set: the default (2176 MiB) would need about 10.6 GiB for reads alone
    worst = (
        READ_PEAK * config.held_request_budget()
        + BYTES_PER_OUTPUT_PIXEL * config.max_inflight_output_pixels
        + FRONT_END_PROCESS
    )
    assert worst <= quantity(frontend["resources"]["limits"]["memory"])


def triton_memory_sum(pod: dict[str, Any], monkeypatch: pytest.MonkeyPatch, on_gpu: bool) -> float:
    """Triton's worst case in GiB, as the memory comment over its limit adds it up (base/deployment.yaml; on
    overlays/gpu, less one sample's attention and the VAE decoder, which run on the GPU there): what cpu-full-smoke
    held plus the budgets' worst case on top (input pixels at an unmeasured estimate), and the /dev/shm tmpfs."""
    results = json.loads((FULL_SMOKE / "results.json").read_text())
    held = sum(gib for name, gib in results["serve"]["after_requests_rss_gib"].items() if name != "frontend")
    config = frontend_config(container(pod, "frontend"), monkeypatch)
    (shm,) = [v["emptyDir"]["sizeLimit"] for v in pod["volumes"] if v["name"] == "dshm"]
    worst = (
        held * GiB
        + BYTES_PER_OUTPUT_PIXEL * config.max_inflight_output_pixels
        + BlsSettings.max_step_cache_mib * MiB
        # Admission takes one request alone whatever its cost: in flight is the larger of the two budgets.
        + BYTES_PER_INPUT_PIXEL * max(config.max_inflight_input_pixels, config.max_request_input_pixels)
        + quantity(shm)
    )
    if not on_gpu:
        worst += BYTES_PER_TOKEN_SQUARED * config.max_sample_tokens**2 + VAE_DECODER_PEAK
    return worst / GiB


def stated_sum(manifest: Path) -> float:
    """The total of the first memory sum in a manifest's comments (`= 29.97 GiB;`): Triton's."""
    found = re.search(r"#  = (\d+\.\d+) GiB;", manifest.read_text())
    assert found, manifest
    return float(found[1])


def test_the_base_serves_the_measured_full_size_configuration(
    pod: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """pytorch-bf16 is the configuration cpu-full-smoke measured; Triton's limit holds what it held there plus the
    budgets' worst case (triton_memory_sum), as its comment says."""
    prepare, triton = container(pod, "prepare-repository", init=True), container(pod, "triton")
    served = f"{env(prepare)['OMNIGEN2_BACKEND']}-{env(prepare)['OMNIGEN2_PRECISION']}"
    assert served == "pytorch-bf16" and f"Served stack ({served})" in (FULL_SMOKE / "results.md").read_text()
    worst = triton_memory_sum(pod, monkeypatch, on_gpu=False)
    assert worst == pytest.approx(stated_sum(DEPLOY / "k8s" / "base" / "deployment.yaml"), abs=0.02)
    assert worst * GiB <= quantity(triton["resources"]["limits"]["memory"])
    config = frontend_config(container(pod, "frontend"), monkeypatch)
    assert config.max_step_tokens >= config.max_sample_tokens  # one sample's step passes the step budget


def test_the_gpu_overlays_host_memory_holds_the_budgets_beside_the_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """overlays/gpu's Triton: the base's sum less what runs on the GPU, input pixels included (before: no sum, the
    base's limit kept unexplained)."""
    (deployment,) = by_kind(render("overlays/gpu"), "Deployment")
    gpu_pod = deployment["spec"]["template"]["spec"]
    worst = triton_memory_sum(gpu_pod, monkeypatch, on_gpu=True)
    assert worst == pytest.approx(stated_sum(DEPLOY / "k8s" / "overlays" / "gpu" / "gpu.yaml"), abs=0.02)
    assert worst * GiB <= quantity(container(gpu_pod, "triton")["resources"]["limits"]["memory"])


def test_the_cpu_stop_grace_outlasts_the_longest_step(pod: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A stopped call is confirmed at the BLS's next step: on CPU the grace covers a step at the step budget, from
    cpu-full-smoke's time a token (its edit step), the pod's cores doing the work of the measured machine's."""
    results = json.loads((FULL_SMOKE / "results.json").read_text())
    edit = generation_cost(GenerationRequest(prompt=FULL_SMOKE_EDIT, width=256, height=256), [(256, 256)], False)
    per_token = results["serve"]["requests"]["edit"]["transformer_step_s"] / edit.step_tokens
    config = frontend_config(container(pod, "frontend"), monkeypatch)
    cores = quantity(container(pod, "triton")["resources"]["limits"]["cpu"]) / results["machine"]["cpus"]
    assert config.stop_grace_s >= per_token * config.max_step_tokens / cores


@pytest.mark.parametrize("kustomization", ["base", "overlays/gpu", "overlays/production"])
def test_every_container_has_guaranteed_resources(kustomization: str) -> None:
    """Requests = limits for CPU and memory in every container, init included: Kubernetes' Guaranteed QoS class, the
    last evicted under node memory pressure."""
    (deployment,) = by_kind(render(kustomization), "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    for c in spec["initContainers"] + spec["containers"]:
        requests, limits = c["resources"]["requests"], c["resources"]["limits"]
        for resource in ("cpu", "memory"):
            assert requests[resource] == limits[resource], (c["name"], resource)


def test_big_empty_dirs_are_requested_as_ephemeral_storage(pod: dict[str, Any]) -> None:
    """The node must have room for the repository the pod writes: the scheduler counts requests, not sizeLimits."""
    (models,) = [v["emptyDir"]["sizeLimit"] for v in pod["volumes"] if v["name"] == "models"]
    for name, init in (("prepare-repository", True), ("triton", False)):
        requested = container(pod, name, init)["resources"]["requests"]["ephemeral-storage"]
        assert quantity(requested) >= quantity(models), name
    # The init container exports no ONNX any more: the pytorch repository holds the bf16 weights (13.3 GiB).
    assert quantity(models) < 40 * GiB


def test_replicas_spread_over_nodes_and_zones(pod: dict[str, Any], base: list[dict[str, Any]]) -> None:
    spread = {c["topologyKey"]: c for c in pod["topologySpreadConstraints"]}
    assert spread.keys() == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    for constraint in spread.values():
        assert constraint["labelSelector"]["matchLabels"].items() <= pod_labels(base).items()
        assert constraint["whenUnsatisfiable"] == "ScheduleAnyway"  # fewer nodes than replicas still schedule


def test_the_openai_http_api_is_served(pod: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    frontend = container(pod, "frontend")
    config = frontend_config(frontend, monkeypatch)
    port = next(port for flag_name, _, port in config.bound_addresses() if flag_name == "--http-listen")
    assert {"containerPort": port, "name": "http"} in frontend["ports"]


@pytest.fixture(scope="module")
def production() -> list[dict[str, Any]]:
    return render("overlays/production")


def test_tls_and_tokens_come_from_secrets(production: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    (deployment,) = by_kind(production, "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    frontend = container(spec, "frontend")
    config = frontend_config(frontend, monkeypatch)
    secrets = {v["name"]: v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
    mounts = {m["mountPath"]: m["name"] for m in frontend["volumeMounts"]}
    for path, key in ((config.tls_cert, "tls.crt"), (config.tls_key, "tls.key"), (config.auth_tokens, "tokens.json")):
        folder, name = path.rsplit("/", 1)
        assert name == key and mounts[folder] in secrets, path
    assert set(secrets.values()) == {"omnigen2-tls", "omnigen2-auth-tokens"}
    for service in by_kind(production, "Service"):  # a mesh or gateway is told the ports speak TLS
        assert [p["appProtocol"] for p in service["spec"]["ports"]] == ["tls", "https"]
    # The kubelet's grpc probes speak plaintext: with TLS they are exec probes over the front end's Unix socket.
    assert all("exec" in frontend[p] for p in ("readinessProbe", "livenessProbe"))
    # The base ships without either, and says so.
    (base_deployment,) = by_kind(render("base"), "Deployment")
    assert not any(a.startswith(("--tls", "--auth")) for a in container(base_deployment["spec"]["template"]["spec"],
                                                                          "frontend")["args"])  # fmt: skip
    text = (DEPLOY / "k8s" / "base" / "deployment.yaml").read_text()
    assert "PLAINTEXT and OPEN" in text and "components/tls-auth" in text


def test_the_tls_probes_reach_the_front_ends_health_over_its_socket(
    production: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The exec probes' commands, run here against a front end in its own process with TLS on its API port (no
    Triton: liveness SERVING, readiness NOT_SERVING), its socket folder under a temporary folder of its own."""
    (deployment,) = by_kind(production, "Deployment")
    frontend = container(deployment["spec"]["template"]["spec"], "frontend")
    cert, key = certificate(tmp_path, "server")
    sockets = Path(tempfile.mkdtemp(prefix="probe-", dir="/tmp"))  # a Unix socket's path has 107 bytes at most
    log = tmp_path / "frontend.log"
    environ = os.environ | {"TMPDIR": str(sockets)}
    flags = [f"--tls-cert={cert}", f"--tls-key={key}", "--listen=127.0.0.1:0", "--http-listen=127.0.0.1:0"]
    flags += ["--metrics-port=0", f"--triton-url=127.0.0.1:{free_port()}", "--no-warmup"]
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "serving.frontend.server", *flags], cwd=REPO, env=environ, stdout=out, stderr=out
        )
    try:

        def probe(name: str) -> int:
            command = [sys.executable if a == "python3" else a for a in frontend[name]["exec"]["command"]]
            command = [a.replace('"/tmp/', f'"{sockets}/') for a in command]
            return subprocess.run(command, cwd=REPO, timeout=60).returncode

        deadline = time.monotonic() + 60
        while not list(sockets.glob("omnigen2-frontend-*/grpc.sock")) or probe("livenessProbe") != 0:
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)  # the socket appears within seconds of the start: each probe is an interpreter of its own
        assert probe("readinessProbe") == 1  # the same server's health: Triton is not there
    finally:
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(sockets, ignore_errors=True)


# kube-state-metrics series the alerts use (its documented names), and Prometheus's own `up`.
KUBE_STATE_METRICS = {
    "kube_deployment_status_replicas_available",
    "kube_pod_container_status_restarts_total",
    "kube_horizontalpodautoscaler_status_current_replicas",
    "kube_horizontalpodautoscaler_spec_max_replicas",
}


def exported_series() -> set[str]:
    """The names the front end's metrics appear under in Prometheus (counters with _total, histograms' parts)."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    return {f.name + end for f in Metrics().registry.collect() for end in suffixes[f.type]}


def test_alerts_are_built_on_series_that_exist_and_each_has_a_runbook_section(
    production: list[dict[str, Any]], pod: dict[str, Any], base: list[dict[str, Any]]
) -> None:
    """Every alert's expression names only series the front end exports, kube-state-metrics' or `up` (a typo would
    be an alert that never fires), with label values the code uses, and docs/runbook.md says what it means and what
    to do. The base has no PrometheusRule (plain clusters lack the CRD)."""
    assert not by_kind(base, "PrometheusRule")
    (rule,) = by_kind(production, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    alerts = [r for group in rule["spec"]["groups"] for r in group["rules"]]
    known = exported_series() | KUBE_STATE_METRICS | {"up"}
    runbook = (REPO / "docs" / "runbook.md").read_text()
    headings = {line.removeprefix("## ").strip() for line in runbook.splitlines() if line.startswith("## ")}
    (job,) = yaml.safe_load((DEPLOY / "k8s" / "prometheus-scrape-frontend.yaml").read_text())
    containers = {c["name"] for c in pod["containers"]}
    codes = {c.name for c in grpc.StatusCode}
    assert len(alerts) >= 8
    for alert in alerts:
        name, expr = alert["alert"], alert["expr"]
        series = set(re.findall(r"\b([a-z_:][a-z0-9_:]*)\s*[{\[]", expr)) - {"by"}
        assert series and series <= known, (name, series - known)
        for label, values in re.findall(r'(\w+)=~?"([^"]*)"', expr):
            wanted = {
                "code": codes,
                "outcome": set(WARMUP_OUTCOMES),
                "job": {job["job_name"]},
                "container": containers,
                "deployment": {"omnigen2"},
                "horizontalpodautoscaler": {"omnigen2"},
            }
            if label in wanted:
                assert set(values.split("|")) <= wanted[label], (name, label, values)  # fmt: skip
        assert alert["labels"]["severity"] in {"warning", "critical"}
        assert name in headings, f"docs/runbook.md has no section '## {name}'"
        assert alert["annotations"]["runbook_url"] == f"docs/runbook.md#{name.lower()}"
