# gnsp: the continual-learning CLIP service on Ray Serve, in one image that starts offline.
#
#   docker build -t gnsp:0.1.0 .
#   docker run --init --shm-size=2g -p 8000:8000 -e GNSP_API_TOKEN="$(openssl rand -hex 32)" \
#       -v gnsp-store:/data/store gnsp:0.1.0
#
# The service listens on 0.0.0.0 in the container, so it refuses to start without GNSP_API_TOKEN
# (write endpoints then need `Authorization: Bearer <token>`); appending `--insecure` to the
# command serves writes unauthenticated, for a container behind a proxy that authenticates.
#
# The base is the Ray image of the Ray version pinned in pyproject.toml (tags follow
# rayproject/ray:<ray version>-<python>[-<platform>]). The plain tag is the CPU image; for NVIDIA
# GPUs build on the CUDA variant (`-gpu` aliases Ray's default `-cuXXX` tag, e.g. -cu128):
#
#   docker build --build-arg BASE_IMAGE=rayproject/ray:2.60.0-py311-gpu -t gnsp:0.1.0-gpu .
#
# torch comes from PyPI either way (its wheels bundle the CUDA runtime), so the same Dockerfile
# serves both; the -gpu base adds the NVIDIA container-runtime wiring Ray expects.
ARG BASE_IMAGE=rayproject/ray:2.60.0-py311
FROM ${BASE_IMAGE}

# The Ray images run as the non-root user `ray` (uid 1000, gid 100) with Python in
# /home/ray/anaconda3; numeric ids below, so Kubernetes' runAsNonRoot can verify them. Root is
# needed only for the system packages and the store folder.
USER 0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Offline reference data: emoji font and flags (image-caption pairs), ISO country names,
# Fashion-MNIST. Debian/Ubuntu data packages: their versions follow the base image's release.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        fonts-noto-color-emoji iso-flags-png-320x240 iso-codes dataset-fashion-mnist opencv-doc \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data/store \
    && chown -R ray:users /data

USER 1000:100
WORKDIR /home/ray
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    GNSP_CACHE_DIR=/home/ray/.cache/gnsp \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

# Dependencies first, from pyproject.toml alone, so editing the sources does not reinstall torch.
# animal-mnist's declared dependencies pull TensorFlow; gnsp only reads its data files.
COPY --chown=ray:users pyproject.toml README.md /tmp/gnsp-src/
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/gnsp-src/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/gnsp-requirements.txt \
    && pip install --no-cache-dir -r /tmp/gnsp-requirements.txt \
    && pip install --no-cache-dir --no-deps animal-mnist==0.4 \
    && rm /tmp/gnsp-requirements.txt

COPY --chown=ray:users gnsp_core /tmp/gnsp-src/gnsp_core
COPY --chown=ray:users service /tmp/gnsp-src/service
RUN pip install --no-cache-dir --no-deps /tmp/gnsp-src \
    && rm -rf /tmp/gnsp-src \
    && python -c "import ray, service, gnsp_core; assert ray.__version__ == '2.60.0', ray.__version__"

# Build the embedded default model (gnsp-mini) now, into $GNSP_CACHE_DIR, so the container
# never needs a network at start-up.
RUN gnsp build-default

VOLUME ["/data/store"]
EXPOSE 8000
# Ray Serve takes a while to start Ray, the controller and the replicas: allow for it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]

CMD ["gnsp", "serve", "--host", "0.0.0.0", "--port", "8000", "--store", "/data/store"]
