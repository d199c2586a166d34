#!/bin/sh
# Installs Atelier into an image: torch first, from the index of the image's target (CPU or a
# CUDA build; a plain `pip install` would pick whichever), then the project with every other
# dependency held to the versions CI tests (deploy/constraints.txt).
set -eu
TORCH_VERSION="$1"
TORCH_INDEX="$2"
pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
# The project pins torch==X; the local build tag (+cpu, +cu128) satisfies it.
pip install --no-cache-dir -c /tmp/atelier/constraints.txt /app
atelier --help >/dev/null
