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
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement

from serving.frontend.config import FrontendConfig
from serving.frontend.health import LIVENESS, SERVICE
from serving.frontend.metrics import Metrics
from serving.triton.launcher import (
    MMAP_THRESHOLD,
    MMAP_THRESHOLD_ENV,
    NO_RESPONSE_POOL,
    STUB_MMAP_THRESHOLD,
    TRITONSERVER_ENV,
)
from serving.triton.memory import STUB_MMAP_THRESHOLD_ENV
from tests.test_triton_install import fake_install

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
KUBERNETES = "1.37.0"  # the newest schema kubernetes-validate ships
KUSTOMIZATIONS = ("base", "overlays/gpu", "overlays/s3")
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
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)


def test_triton_and_the_front_end_share_a_pod_over_loopback(pod: dict[str, Any]) -> None:
    assert [c["name"] for c in pod["containers"]] == ["triton", "frontend"]
    assert "--triton-url=127.0.0.1:8001" in container(pod, "frontend")["args"]
    triton = container(pod, "triton")["command"]
    assert "--http-address=127.0.0.1" in triton and "--grpc-port=8001" in triton
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_probes_use_the_grpc_health_service(pod: dict[str, Any]) -> None:
    frontend, triton = container(pod, "frontend"), container(pod, "triton")
    assert frontend["readinessProbe"]["grpc"] == {"port": 50051, "service": SERVICE}  # follows Triton and the drain
    assert frontend["livenessProbe"]["grpc"] == {"port": 50051, "service": LIVENESS}  # the front end itself
    assert triton["livenessProbe"]["grpc"]["port"] == triton["startupProbe"]["grpc"]["port"] == 8001


def test_termination_outlasts_the_drain(pod: dict[str, Any]) -> None:
    frontend, triton = container(pod, "frontend"), container(pod, "triton")
    drain = float(env(frontend)["OMNIGEN2_SHUTDOWN_GRACE_S"])
    front_stop = int(frontend["lifecycle"]["preStop"]["exec"]["command"][1]) + drain
    triton_stop = int(triton["lifecycle"]["preStop"]["exec"]["command"][1])
    exit_timeout = next(int(a.split("=")[1]) for a in triton["command"] if a.startswith("--exit-timeout-secs="))
    assert triton_stop > front_stop  # Triton serves the calls that are draining
    assert pod["terminationGracePeriodSeconds"] >= triton_stop + exit_timeout > front_stop
    # The liveness probe must not kill a draining front end: its misses take longer than the drain.
    liveness = frontend["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > drain


def test_services_budget_and_network_policy(base: list[dict[str, Any]], pod: dict[str, Any]) -> None:
    services = {s["metadata"]["name"]: s["spec"] for s in by_kind(base, "Service")}
    assert services["omnigen2-headless"]["clusterIP"] == "None"
    assert services["omnigen2"]["type"] == "ClusterIP"
    assert all(spec["ports"] == [{**spec["ports"][0], "targetPort": "api"}] for spec in services.values())
    labels = base[0]["metadata"]["labels"]
    (pdb,) = by_kind(base, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    (policy,) = by_kind(base, "NetworkPolicy")
    open_to_all = [rule for rule in policy["spec"]["ingress"] if "from" not in rule]
    assert [p["port"] for rule in open_to_all for p in rule["ports"]] == ["api"]
    named = {p["name"] for c in pod["containers"] for p in c.get("ports", [])}
    assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} <= named
    for selector in (pdb["spec"]["selector"], policy["spec"]["podSelector"]):
        assert selector["matchLabels"].items() <= {**pod_labels(base), **labels}.items()


def pod_labels(objects: list[dict[str, Any]]) -> dict[str, str]:
    (deployment,) = by_kind(objects, "Deployment")
    return dict(deployment["spec"]["template"]["metadata"]["labels"])


def test_autoscaler_reads_queue_time_and_in_flight_through_the_adapter(base: list[dict[str, Any]]) -> None:
    (hpa,) = by_kind(base, "HorizontalPodAutoscaler")
    (adapter,) = [c for c in by_kind(base, "ConfigMap") if "adapter" in c["metadata"]["name"]]
    rules = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    served = {rule["name"]["as"]: rule for rule in rules}
    wanted = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    assert wanted <= served.keys()
    assert "nv_inference_queue_duration_us" in served["omnigen2_queue_seconds"]["metricsQuery"]
    in_flight = Metrics().in_flight._name  # the front end's own gauge, as it exports it
    assert in_flight in served["omnigen2_in_flight_requests"]["seriesQuery"]


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


def test_gpu_pods_share_one_build_cache(pod: dict[str, Any]) -> None:
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
    usage = subprocess.run(
        [sys.executable, "-m", "serving.artifacts.repository", "--help"], capture_output=True, text=True, check=True
    ).stdout
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
        ("frontend.Dockerfile", r"python:3\.11\.\d+-slim-\w+", {"50051", "9464"}),
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
    assert "serving.health_probe" in healthcheck


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
    for name in ("triton", "frontend"):
        assert "serving.health_probe" in services[name]["healthcheck"]["test"]
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
    (adapter,) = [c for c in by_kind(base, "ConfigMap") if "adapter" in c["metadata"]["name"]]
    in_flight = Metrics().in_flight._name
    (rule,) = [r for r in yaml.safe_load(adapter["data"]["config.yaml"])["rules"] if in_flight in r["seriesQuery"]]
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
