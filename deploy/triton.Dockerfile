# syntax=docker/dockerfile:1
# Triton with the project's Python models: the NGC release (Triton, its Python and TensorRT backends, CUDA,
# TensorRT) plus this package with its `model` extra (the BLS, the mllm and component models, the repository
# generator and the engine builder). The model repository is generated from a checkpoint volume when a pod or
# container starts (deploy/k8s: the init container; deploy/compose.yaml: the `prepare` service), in /models:
#   python3 -m serving.artifacts.repository --checkpoint /checkpoints/OmniGen2 --out /models/model_repository --backend tensorrt
# The `tensorrt` backend exports ONNX graphs and builds the engines from them with export/build_engines.py's library
# (serving/artifacts/engines.py), on the GPU that will run them, into /models/build/engines or --engines (cached by
# checkpoint, GPU, TensorRT version, precision and profiles: a kept /models volume makes a restart a no-op; on
# deploy/k8s/overlays/gpu one volume shared by the pods, each engine built once under a file lock); the CMD serves the
# result. `python3 -m serving.stack` run in this image starts its /opt/tritonserver, TensorRT backend included.
# Not built where it was written (no Docker engine there): tests/test_deploy.py checks what matters in it.
#   docker build -f deploy/triton.Dockerfile -t omnigen2/triton:0.1.0 .

FROM nvcr.io/nvidia/tritonserver:25.11-py3
# PyTorch for the image's CUDA major version (the mllm model and the PyTorch components run on it).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
ENV PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1
WORKDIR /opt/omnigen2
COPY pyproject.toml README.md ./
COPY proto/ proto/
COPY client/ client/
COPY serving/ serving/
COPY export/ export/
COPY benchmarks/ benchmarks/
# The Python backend's stub runs the image's python3, so the packages go into its site-packages. The TensorRT
# Python bindings must match the libnvinfer Triton's tensorrt backend loads: the version is read from the image.
# The last step fails the build if the launcher would not find this Triton with its TensorRT backend.
RUN python3 -m pip install --extra-index-url "${TORCH_INDEX}" ./client '.[model]' \
    && trt="$(ls /usr/lib/*-linux-gnu/libnvinfer.so.10.*.* | head -n1 | sed 's/.*libnvinfer\.so\.//')" \
    && python3 -m pip install "tensorrt-cu${CUDA_VERSION%%.*}==${trt}.*" \
    && python3 -c "import serving.triton.bls, serving.artifacts.engines, tensorrt" \
    && python3 -c "from serving.triton.install import TritonInstall; TritonInstall.find().require_backend('tensorrt')"
# The NGC image's unprivileged user (uid 1000); /models is where the generated repository goes (a volume).
RUN mkdir -p /models && chown 1000:1000 /models
USER 1000:1000
ENV HOME=/tmp
VOLUME ["/models"]
# 8000 HTTP, 8001 gRPC (the front end's, over loopback), 8002 Prometheus metrics (nv_inference_queue_duration_us).
EXPOSE 8000 8001 8002
# Triton's gRPC health service (grpc.health.v1 Check) answers SERVING once the server is ready, but stays SERVING
# when a Python model's stub process dies: the probe also looks for each ready Python model's stub
# (serving/triton/stub_probe.py).
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-m", "serving.triton.stub_probe", "--address", "127.0.0.1:8001"]
# Memory back after large answers, as `make serve` runs it (serving/triton/launcher.py): glibc's mmap threshold fixed
# for Triton, glibc's own ceiling for its stubs (serving/triton/memory.py), no pool of gRPC responses.
ENV MALLOC_MMAP_THRESHOLD_=1048576 OMNIGEN2_STUB_MMAP_THRESHOLD=33554432
CMD ["tritonserver", "--model-repository=/models/model_repository", "--model-control-mode=explicit", \
     "--load-model=*", "--strict-readiness=true", "--exit-on-error=true", "--grpc-infer-allocation-pool-size=0"]
