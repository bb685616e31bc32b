#!/usr/bin/env bash
# GPU check in one go, on a fresh GPU machine where python3 already has torch with CUDA:
#   benchmarks/gpu_check.sh [WHEEL_DIR]
# installs what WHEEL_DIR holds (*.whl, or site-*.tar.xz archives of an installed site folder) for
# PyAV / PyNvVideoCodec / pydantic, probes NVDEC, runs the `cuda` tests and `framewatch bench`, and prints
# a short table last. Results: $OUT (if set) or benchmarks/results/gpu. Budget: about 6 minutes.
# benchmarks/gpu_wheels.sh makes WHEEL_DIR (a 35 MB site archive and py-spy) where pip reaches the registry.
#   BENCH_STREAMS (32), BENCH_KEYFRAME_STREAMS (128), BENCH_SECONDS (10), BENCH_CODECS (h264,hevc), BENCH_TIERS,
#   BENCH_PROCS (1,4), BENCH_DECODE_BATCH (8), PROBE=0 (skip the NVDEC probe), STAGES (default: clips tests corruption audio profile service bench), SERVICE_WORKERS (1,4), TEST_TIMEOUT, BENCH_TIMEOUT, TESTS_ISOLATED=1 (each cuda test in its own process: a native crash loses one test only, ~3 min), PROFILE=1 (a py-spy GIL profile when .whl/tools/py-spy exists)
set -u
cd "$(dirname "$0")/.."
WHEELS=${1:-.whl}
RESULTS=${OUT:-benchmarks/results/gpu}
SITE=${FRAMEWATCH_SITE:-/tmp/framewatch-site}
PY=${PYTHON:-python3}
mkdir -p "$SITE" "$RESULTS"
export PYTHONUNBUFFERED=1
t0=$(date +%s)
STAGES=${STAGES:-clips tests corruption audio profile service bench}
has() { case " $STAGES " in *" $1 "*) return 0 ;; esac; return 1; }

for a in "$WHEELS"/*.tar.xz "$WHEELS"/*/*.tar.xz; do
  [ -f "$a" ] && tar -xJf "$a" -C "$SITE"
done
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl || exit 1
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "== install $(( $(date +%s) - t0 )) s"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.memory --format=csv,noheader
$PY -c "import torch, av, pydantic; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'av', av.__version__)"

SECS=${BENCH_SECONDS:-10}
has clips && echo "== clips" && $PY -c "
from pathlib import Path; from engine.bench import make_clip
for c in '${BENCH_CODECS:-h264,hevc}'.split(','):
    make_clip(Path('/tmp/framewatch-clips') / f'bench_{c}_1080p30_8M_${SECS%.*}s.mp4', c, float('$SECS'))
" && echo "clips ready at $(( $(date +%s) - t0 )) s"
export PROBE_CLIP=/tmp/framewatch-clips/bench_h264_1080p30_8M_${SECS%.*}s.mp4

if [ "${PROBE:-1}" != 0 ]; then
  echo "== NVDEC probe"
  timeout 60 $PY benchmarks/nvdec_probe.py 2>&1 | cut -c1-700
fi

if has tests; then
  # -s lets a native library's last words (an abort inside the decoder) reach the log instead of pytest's
  # capture file; TESTS_ISOLATED=1 runs each test in its own process, so such a crash loses that test alone.
  echo "== cuda tests"
  : > "$RESULTS/cuda_tests.log"
  npass=0; nfail=0
  collected=$($PY -m pytest --collect-only -q -m cuda -p no:cacheprovider tests/ 2>/dev/null | grep '::')
  if [ -n "${TESTS_ISOLATED:-}" ]; then runs=$collected; else runs=$(echo "$collected" | cut -d: -f1 | sort -u | paste -sd,); fi
  for id in $runs; do
    timeout ${TEST_TIMEOUT:-120} $PY -m pytest -q -s -rs -vv -p no:cacheprovider --tb=short -m cuda ${id//,/ } > /tmp/framewatch-test.log 2>&1
    rc=$?
    if [ $rc = 0 ] && ! grep -q " passed" /tmp/framewatch-test.log; then line="SKIP $id ($(grep -o 'SKIPPED.*' /tmp/framewatch-test.log | head -1))"
    elif [ $rc = 0 ]; then npass=$((npass + 1)); line="PASS $id"; else nfail=$((nfail + 1)); line="FAIL (rc $rc) $id"; fi
    echo "$line" | tee -a "$RESULTS/cuda_tests.log"
    [ -z "${TESTS_ISOLATED:-}" ] && grep -E "(PASSED|FAILED|ERROR)( |$)" /tmp/framewatch-test.log | tee -a "$RESULTS/cuda_tests.log"
    if [ $rc != 0 ]; then { echo "---- $id"; grep -v -E "^  File \"/(usr|opt)/|^Extension modules" /tmp/framewatch-test.log | tail -80; echo "----"; } >> "$RESULTS/cuda_tests.log"; fi
  done
  if [ -n "${TESTS_ISOLATED:-}" ]; then summary="$npass passed, $nfail failed"
  else summary=$(grep -E "[0-9]+ (passed|failed|skipped)" /tmp/framewatch-test.log | tail -1 | tr -d '='); fi
  echo "cuda tests: $summary" | tee -a "$RESULTS/cuda_tests.log"
  echo "== tests done at $(( $(date +%s) - t0 )) s"
fi

has corruption && echo "== corruption CNN on the GPU (1080p analysis planes, fp16, batch 64)" && timeout 60 $PY -c "
import json, sys; sys.path.insert(0, 'benchmarks')
from corruption_vs_blockdetect import _model_gpu_fps
from models.weights import SHIPPED, load
m, meta = load(SHIPPED)
fps = _model_gpu_fps(m)
print(f'corruption model {meta.version}: {fps:.0f} frames/s'); json.dump({'version': meta.version, 'gpu_frames_per_s_1080p': fps}, open('$RESULTS/corruption_gpu.json', 'w'))
" 2>&1 | tail -3

if has audio; then
  # Issue 5's GPU figure: audio scoring cost per stream-hour, the same batch on the CPU and on the GPU (no FFmpeg
  # CLI there, so no peer; the sample soundtrack is not there either, so generated programme noise).
  echo "== audio scoring cost (32 streams x 20 s; CPU then GPU)"
  for d in cpu cuda; do
    timeout 150 $PY benchmarks/audio_bench.py --device $d --streams 32 --seconds 20 --skip-sync --ffmpeg-runs 0 \
      --out "$RESULTS/audio_bench_$d.json" 2>&1 | grep -E "^Audio cost|framewatch,|Error|audio_bench:"
  done
fi

SPY=
for s in "$WHEELS/tools/py-spy" "$WHEELS/../tools/py-spy" .whl/tools/py-spy; do [ -x "$s" ] && SPY=$s && break; done
if has profile && [ -n "${PROFILE:-}" ] && [ -n "$SPY" ]; then
  echo "== GIL profile of end to end (h264, tier all, ${BENCH_STREAMS:-32} streams)"
  timeout 120 $SPY record --gil -r 250 --format raw -o "$RESULTS/profile_gil.txt" -- \
    $PY -m engine.cli bench --device cuda --streams "${BENCH_STREAMS:-32}" --clip-seconds "${BENCH_SECONDS:-10}" \
    --codecs h264 --tiers all --procs 1 --clip-dir /tmp/framewatch-clips --json "$RESULTS/profile_bench.json" 2>&1 | tail -8
fi

if has service; then
  # serve's worker processes (engine.workers) against one process, the service's own code path, same clip.
  echo "== service throughput (h264, ${BENCH_STREAMS:-32} streams, workers ${SERVICE_WORKERS:-1,4})"
  timeout 200 $PY benchmarks/service_throughput.py --device cuda --clip "$PROBE_CLIP" --streams "${BENCH_STREAMS:-32}" \
    --workers "${SERVICE_WORKERS:-1,4}" --timeout 80 --json "$RESULTS/service_throughput.json" 2>&1 | tail -5
fi

has bench && echo "== bench" && timeout -s INT -k 20 ${BENCH_TIMEOUT:-270} $PY -m engine.cli bench --device cuda \
  --streams "${BENCH_STREAMS:-32}" --clip-seconds "${BENCH_SECONDS:-10}" \
  --codecs "${BENCH_CODECS:-h264,hevc}" --tiers "${BENCH_TIERS:-all,skip_nonref,keyframes}" \
  --procs "${BENCH_PROCS:-1,4}" --decode-batch "${BENCH_DECODE_BATCH:-8}" --keyframe-streams "${BENCH_KEYFRAME_STREAMS:-128}" --clip-dir /tmp/framewatch-clips \
  --json "$RESULTS/gpu_bench.json" --calibration "$RESULTS/calibration.json" 2>&1 | tail -60
echo "== total $(( $(date +%s) - t0 )) s"
