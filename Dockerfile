# syntax=docker/dockerfile:1
# retrieval-engine: the search API (`retrieval serve`) in a slim CPU image, run as a non-root user.
# The index and the query-encoder models are mounted, not baked in. Build, run and the GPU variant:
# docs/docker.md. tests/core/test_dockerfile.py checks this file against the repository.

ARG PYTHON_IMAGE=python:3.11-slim

# ---- builder: a virtual environment with the project and its dependencies --------------------------
FROM ${PYTHON_IMAGE} AS builder

# CPU-only PyTorch wheels (far smaller than the default CUDA ones); the GPU variant overrides both args.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Optional extras of the project, e.g. "gpu" (onnxruntime-gpu, faiss-gpu).
ARG EXTRAS=""

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch and torchvision first, from the chosen wheel index, within the ranges pyproject.toml allows:
# the `pip install .` below then finds them satisfied and does not fetch the default (CUDA) wheels.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch>=2.14,<2.15" "torchvision>=0.29,<0.30"

WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY retrieval ./retrieval
COPY models ./models
COPY training ./training
COPY indexing ./indexing
COPY serving ./serving
RUN pip install ".${EXTRAS:+[${EXTRAS}]}"
# onnxruntime/onnxruntime-gpu and faiss-cpu/faiss-gpu install the same module: keep only the GPU build.
RUN if pip show onnxruntime-gpu >/dev/null 2>&1; then \
        pip uninstall -y onnxruntime && pip install --force-reinstall --no-deps onnxruntime-gpu; \
    fi \
 && if pip show faiss-gpu >/dev/null 2>&1; then \
        pip uninstall -y faiss-cpu && pip install --force-reinstall --no-deps faiss-gpu; \
    fi

# ---- runtime: the virtual environment on a clean base, no build tools, no sources -----------------
FROM ${PYTHON_IMAGE} AS runtime

# OpenMP runtime used by FAISS and torch on CPU.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin retrieval \
 && mkdir -p /data/index /data/models \
 && chown retrieval:retrieval /data/index /data/models

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

USER retrieval
WORKDIR /home/retrieval

# The index directory (read-only is fine) and the query-encoder checkpoints or ONNX files.
VOLUME ["/data/index", "/data/models"]
EXPOSE 8000

# Liveness only (the slim image has no curl): readiness, after the warm-up query, is /v1/readyz.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:8000/v1/healthz', timeout=4); sys.exit(0 if r.status == 200 else 1)"]

ENTRYPOINT ["retrieval", "serve"]
CMD ["--index", "/data/index", "--host", "0.0.0.0", "--port", "8000"]
