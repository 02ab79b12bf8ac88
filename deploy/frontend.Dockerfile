# syntax=docker/dockerfile:1
# The OmniGen2 API front end: validates, admits and forwards to Triton. It installs the project without extras, so
# no torch, transformers, diffusers or ONNX Runtime (the `model` extra is the Triton image's). Not built where it
# was written (no Docker engine there): tests/test_deploy.py checks what matters in it, and docs/scaling.md says so.
#   docker build -f deploy/frontend.Dockerfile -t omnigen2/frontend:0.1.0 .

FROM python:3.11.14-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto/ proto/
COPY client/ client/
COPY serving/ serving/
COPY export/ export/
COPY benchmarks/ benchmarks/
# The SDK builds its gRPC stubs from proto/ (grpcio-tools, in its isolated build environment).
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir ./client . \
    && /opt/venv/bin/python -c "import serving.frontend.server" \
    && ! /opt/venv/bin/pip show --quiet torch transformers diffusers onnxruntime 2>/dev/null

FROM python:3.11.14-slim-bookworm
COPY --from=build /opt/venv /opt/venv
RUN groupadd --system --gid 1000 omnigen2 && useradd --system --uid 1000 --gid 1000 --no-create-home omnigen2
USER 1000:1000
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    OMNIGEN2_LISTEN=0.0.0.0:50051 \
    OMNIGEN2_METRICS_ADDRESS=0.0.0.0 \
    OMNIGEN2_METRICS_PORT=9464 \
    OMNIGEN2_TRITON_URL=127.0.0.1:8001
# 50051: the gRPC API (with gRPC health and reflection); 8080: the OpenAI-compatible HTTP API, once
# --http-listen=0.0.0.0:8080 turns it on (deploy/k8s does); 9464: Prometheus metrics.
EXPOSE 50051 8080 9464
# SERVING while Triton and every model are ready, once the front end's warm-up has run (Kubernetes probes the same
# service natively). The start period covers that warm-up (up to --warmup-timeout-s, 120 s) after Triton is ready.
HEALTHCHECK --interval=10s --timeout=5s --start-period=150s --retries=3 \
    CMD ["python", "-m", "serving.health_probe", "--address", "127.0.0.1:50051", "--service", "omnigen2.v1.OmniGen2"]
ENTRYPOINT ["python", "-m", "serving.frontend.server"]
