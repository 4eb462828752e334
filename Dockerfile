# The restage image for KubeRay (deploy/kuberay/) and the Ray cluster launcher: Ray's own
# CUDA image (Ray, Python 3.11, CUDA 12) with restage installed. The Ray version must match
# the one restage installs (pyproject: ray>=2.44; this image: the version tested here).
#   docker build -t restage:latest .
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/restage
# Dependencies first (cached layer), then the code.
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users ray_app ./ray_app
COPY --chown=ray:users actors ./actors
COPY --chown=ray:users pipelines ./pipelines
COPY --chown=ray:users serve ./serve
# DL3013 asks to pin packages: this installs the project itself, bounded by pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[cloud]"

# Checkpoints are cached per node under RESTAGE_CACHE; mount a volume there to keep them.
ENV RESTAGE_CACHE=/home/ray/.cache/restage \
    HF_HUB_DISABLE_TELEMETRY=1
