#!/usr/bin/env bash
# Packs what benchmarks/gpu_check.sh needs on a GPU machine that has torch, CuPy and NVML but no package registry:
#   benchmarks/gpu_wheels.sh [OUT_DIR]        (default .whl, which .gitignore keeps out of the repository)
# Run it where pip can reach the registry. It downloads the CPython 3.12 manylinux wheels of PyAV, PyNvVideoCodec
# and pydantic (with the packages pydantic needs), unpacks them into one site folder, leaves out what is not needed
# at run time (FFmpeg's source tarball and the samples inside PyNvVideoCodec's wheel) and packs that folder as
# OUT_DIR/site-gpu.tar.xz: about 35 MB against 62 MB of wheels, so that the tree plus the archive stay under a
# device call's 64 MB. py-spy's binary goes to OUT_DIR/tools/py-spy for gpu_check.sh's PROFILE=1.
# Versions: AV, PYNVVIDEOCODEC, PYDANTIC, PYDANTIC_CORE (the pair must match), PY_SPY.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.whl}
PY=${PYTHON:-python3}
AV=${AV:-19.0.2}
PYNVVIDEOCODEC=${PYNVVIDEOCODEC:-2.2.4}
PYDANTIC=${PYDANTIC:-2.12.5}
PYDANTIC_CORE=${PYDANTIC_CORE:-2.41.5}
PY_SPY=${PY_SPY:-0.4.3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d "$work/wheels" "av==$AV" "pynvvideocodec==$PYNVVIDEOCODEC" "pydantic==$PYDANTIC" "pydantic-core==$PYDANTIC_CORE" \
  annotated-types typing-inspection "py-spy==$PY_SPY"
mkdir -p "$work/site" "$OUT/tools"
for w in "$work"/wheels/*.whl; do
  case "$(basename "$w")" in
    py_spy-*) unzip -q -o -j "$w" '*/scripts/py-spy' -d "$OUT/tools" && chmod +x "$OUT/tools/py-spy" ;;
    *) unzip -q -o "$w" -d "$work/site" ;;
  esac
done
rm -rf "$work"/site/*.data "$work/site/samples" "$work/site/benchmarks"
tar -C "$work/site" -cf - . | xz -T0 -6 > "$OUT/site-gpu.tar.xz"
ls -l "$OUT/site-gpu.tar.xz" "$OUT/tools/py-spy"
echo "carry $OUT to the GPU machine and run: benchmarks/gpu_check.sh $OUT"
