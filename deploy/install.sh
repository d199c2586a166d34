#!/bin/sh
# Installs Atelier into an image in two steps, so that the dependencies are a layer of their own:
#   install.sh deps TORCH_VERSION TORCH_INDEX   torch from the image's index (CPU or a CUDA
#       build; a plain `pip install` would pick whichever), then pyproject.toml's dependencies
#       held to the versions CI tests (deploy/constraints.txt); no source needed.
#   install.sh app                              the project itself from /app, nothing resolved.
set -eu
case "$1" in
deps)
    pip install --no-cache-dir "torch==$2" --index-url "$3"
    python -c 'import tomllib; print("\n".join(tomllib.load(open("/tmp/atelier/pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/atelier/requirements.txt
    # The project pins torch==X; the local build tag (+cpu, +cu128) satisfies it.
    pip install --no-cache-dir -c /tmp/atelier/constraints.txt -r /tmp/atelier/requirements.txt
    ;;
app)
    pip install --no-cache-dir --no-deps /app
    atelier --help >/dev/null
    ;;
*)
    echo "usage: install.sh deps TORCH_VERSION TORCH_INDEX | install.sh app" >&2
    exit 2
    ;;
esac
