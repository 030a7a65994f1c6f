#!/usr/bin/env bash
# Download, HERE (a machine that reaches PyPI), the wheels that the GPU machine lacks, into .whl/
# at the repository root (ignored by git; carried to the GPU machine with `carry: [".whl"]`).
#
#   bash benchmarks/prepare_gpu_wheels.sh          # ~25 MB, pure-Python wheels plus a few small binary ones
#
# The GPU image ships torch, accelerate, safetensors, typer, rich, pyyaml, pillow, numpy,
# sentencepiece, onnxruntime, but NOT diffusers, rapidfuzz or moocore, and its transformers is 5.x
# (apex needs < 5, and transformers 4.57 needs huggingface_hub < 1 and tokenizers <= 0.23.0).
# Versions match the development venv so both machines run the same library code.
# Wheels are for CPython 3.12 on x86-64 Linux (the GPU machine's python3); --no-deps: every
# needed package is named here explicitly.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
mkdir -p "$DEST"

# name==version, pinned to what the dev venv has (override with VERSIONS="a==1 b==2")
VERSIONS=${VERSIONS:-"diffusers==0.39.0 transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2 peft==0.21.2 rapidfuzz==3.14.6 moocore==0.3.2 cffi==2.1.1 platformdirs==4.14.8 pycparser==3.12"}

for spec in $VERSIONS; do
  name=${spec%%==*}
  if ls "$DEST" | grep -qi "^$(echo "$name" | tr '-' '_')-"; then
    echo "have $spec"; continue
  fi
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    --platform any -d "$DEST" "$spec"
done
ls -la "$DEST"
du -sh "$DEST"
