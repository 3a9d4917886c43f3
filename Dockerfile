# syntax=docker/dockerfile:1
# segserve images (docs/deploy.md):
#   docker build -t segserve .                             GPU serving image (the last stage)
#   docker build --target serve-cpu -t segserve:cpu .      CPU serving image (no CUDA libraries)
#   docker build --target export -t segserve-export .      checkpoint -> bundle, CPU PyTorch
# Serving images have no PyTorch and no compilers. onnxruntime-gpu brings CUDA 13 and cuDNN 9 as
# pip packages, so a slim Python base is enough; the host needs only the NVIDIA driver and the
# NVIDIA container toolkit.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- dependency venvs (build only)
FROM ${PYTHON_IMAGE} AS deps-gpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY requirements/serve-gpu.txt requirements/constraints.txt /tmp/requirements/
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install -r /tmp/requirements/serve-gpu.txt \
        -c /tmp/requirements/constraints.txt

FROM ${PYTHON_IMAGE} AS deps-cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY requirements/serve.txt requirements/constraints.txt /tmp/requirements/
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install -r /tmp/requirements/serve.txt \
        -c /tmp/requirements/constraints.txt

# ---------------------------------------------------------------- export (build side, CPU torch)
FROM ${PYTHON_IMAGE} AS export
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
COPY requirements/ /tmp/requirements/
# The CPU build of torch comes from PyTorch's own index; PyPI's Linux wheel would pull CUDA.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && /opt/venv/bin/pip install -r /tmp/requirements/export.txt \
        -c /tmp/requirements/constraints.txt \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin segserve
WORKDIR /app
COPY models/ models/
COPY export/ export/
COPY service/ service/
USER 10001
ENV PATH=/opt/venv/bin:$PATH
ENTRYPOINT ["python", "-m", "export"]
CMD ["--help"]

# ---------------------------------------------------------------- what both serving images share
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    SEGSERVE_MODEL_REPOSITORY=/models \
    NUMBA_CACHE_DIR=/tmp/numba-cache
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin segserve
WORKDIR /app
# The label kernel (service/labelmap.py) is compiled while the image builds, into /app/numba-cache.
# Numba only uses a cache directory it can write, and the root filesystem is read-only when
# deployed, so `python -m service` copies it into NUMBA_CACHE_DIR under /tmp before the warm-up
# (service/__main__.py): loaded in about a second instead of compiled for a minute at every start.
# A host whose CPU differs recompiles it once per start.
RUN mkdir numba-cache && chown 10001 numba-cache
EXPOSE 8000
# Ready = every model loaded and warmed (the mask store is reported, not required); urlopen raises
# on a 503.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
# One process owns the device and batches every request for it: scale with replicas, not workers.
CMD ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]

FROM runtime AS serve-cpu
ENV SEGSERVE_PROVIDERS=cpu
COPY --from=deps-cpu /opt/venv /opt/venv
COPY service/ service/
USER 10001
RUN NUMBA_CACHE_DIR=/app/numba-cache python -c "from service.engine import compile_kernels; compile_kernels()"

# ---------------------------------------------------------------- GPU serving image (default)
FROM runtime AS serve
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# On a GPU node a missing CUDA provider is an error, not a silent 50x slowdown.
ENV SEGSERVE_PROVIDERS=cuda SEGSERVE_ALLOW_CPU_FALLBACK=false
COPY --from=deps-gpu /opt/venv /opt/venv
# Let the dynamic loader find the CUDA/cuDNN libraries the nvidia-* wheels unpacked in the venv
# (onnxruntime's CUDA provider dlopens them by soname), wherever each wheel put its lib/ folder.
RUN find /opt/venv -path '*/site-packages/nvidia/*' -name 'lib*.so*' -printf '%h\n' \
        | sort -u > /etc/ld.so.conf.d/segserve-nvidia-pip.conf \
    && ldconfig
COPY service/ service/
USER 10001
RUN NUMBA_CACHE_DIR=/app/numba-cache python -c "from service.engine import compile_kernels; compile_kernels()"
