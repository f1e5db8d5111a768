#!/usr/bin/env bash
# Wheels for `make gpu-check` on a GPU machine that has torch, transformers and peft but no
# network and no DeepSpeed, pydantic or hjson. Run here, where pip reaches PyPI:
#
#     bash benchmarks/gpu_bundle.sh            # -> build/gpu-wheels (ignored by git), ~4 MB
#
# then carry build/gpu-wheels with the tree; `make gpu-check` installs them from that folder
# (--no-index, into build/gpu-site) when they do not import there. The versions are this
# venv's, so the device runs what the tests ran. The device's Python is 3.12 on x86_64.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-build/gpu-wheels}
PY=${PY:-.venv/bin/python}
LIMIT_MIB=64  # what one device call may carry

version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }

rm -rf "$OUT"
mkdir -p "$OUT"
# DeepSpeed ships as an sdist: build its pure-Python wheel here. No ops are prebuilt
# (DS_BUILD_OPS=0); the device JIT-builds what it needs, and ift uses torch's fused AdamW.
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" \
    "deepspeed==$(version deepspeed)"
# What DeepSpeed and ift's config need and the device image lacks (it has einops, msgpack,
# ninja, psutil, py-cpuinfo, numpy, pyarrow, pyyaml, jinja2, tqdm). pydantic-core is compiled:
# the cp312 manylinux build.
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$OUT" \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any \
    "pydantic==$(version pydantic)" "pydantic-core==$(version pydantic-core)" \
    "annotated-types==$(version annotated-types)" \
    "typing-inspection==$(version typing-inspection)" \
    "typing-extensions==$(version typing-extensions)" \
    "hjson==$(version hjson)"

ls -l "$OUT"
bytes=$(du -sb "$OUT" | cut -f1)
echo "[gpu-bundle] $(ls "$OUT" | wc -l) wheels, $((bytes / 1024)) KiB in $OUT"
if [ "$bytes" -gt $((LIMIT_MIB * 1024 * 1024)) ]; then
    echo "[gpu-bundle] over the ${LIMIT_MIB} MiB a device call may carry" >&2
    exit 1
fi
