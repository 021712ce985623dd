#!/usr/bin/env bash
# The GPU checks in one go, for a CUDA machine that may have no package index:
#
#   benchmarks/gpu_check.sh OUT_DIR
#
# 1. set-up: wheels from $WHEELS (a folder; installed with --no-index into a folder on
#    PYTHONPATH) and Debian packages from $DEBS (unpacked into /, for libaio, which DeepSpeed's
#    async I/O needs for NVMe offload), each only when given;
# 2. the tests marked gpu (`make test-gpu`'s selection, or $TESTS; more pytest options, such as
#    xdist's "-n 4", in $PYTEST_ARGS; each test at most $TEST_TIMEOUT_S seconds) and beside them
#    the tutorials (options in $TUTORIAL_ARGS), all within $TESTS_S seconds,
#    with the GPU benchmark's figures in $BESIDE_TESTS (memory figures: timing-free) alongside;
# 3. the GPU benchmark (`python -m benchmarks.gpu $BENCH`), at most $BENCH_S seconds.
#
# Everything lands in OUT_DIR: env.txt, gpu-tests.log and gpu-tutorials.log, bench.log, the
# results JSON, and logs.tgz (JUnit files, the runs' logs, results and events, the executed
# notebooks). Each phase has its own time limit, so a hang in one still leaves the others' results.
set -u
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
tests=${TESTS:-tests/test_gpu.py tests/test_step_sync.py}
basetemp=/tmp/nexa-gpu

if [ -n "${WHEELS:-}" ]; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/nexa-site "$WHEELS"/*.whl ||
    exit 1
  export PYTHONPATH=/tmp/nexa-site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -n "${DEBS:-}" ] && [ ! -e /usr/include/libaio.h ]; then
  for deb in "$DEBS"/*.deb; do dpkg -x "$deb" /; done
  ldconfig
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# DeepSpeed compiles its ops on first use: for this GPU only, on every core. The image's own list
# (kept in env.txt) may name arch-specific variants such as 9.0a, which DeepSpeed cannot read.
image_arch_list=${TORCH_CUDA_ARCH_LIST:-unset}
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1)
export TORCH_CUDA_ARCH_LIST=$cap MAX_JOBS=${MAX_JOBS:-$(nproc)}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv
  nproc
  free -g | head -2
  echo "TORCH_CUDA_ARCH_LIST: image $image_arch_list, used $TORCH_CUDA_ARCH_LIST"
  $py -c "import sys, torch, accelerate, deepspeed, transformers, peft; print(sys.version.split()[0], *(f'{m.__name__} {m.__version__}' for m in (torch, accelerate, deepspeed, transformers, peft)), 'cuda', torch.version.cuda)"
} >"$out/env.txt" 2>&1

beside=
if [ -n "${BESIDE_TESTS:-}" ]; then
  # shellcheck disable=SC2086
  timeout "${TESTS_S:-300}" $py -m benchmarks.gpu --out "$out" $BESIDE_TESTS >"$out/bench-beside.log" 2>&1 &
  beside=$!
fi
# The tutorials (minutes each) in a second pytest beside the rest, each tutorial test limited only by
# the part's time ($TUTORIAL_ARGS, e.g. xdist's "-n 2", runs them side by side); each part writes a JUnit file.
has_timeout=$($py -c "import pytest_timeout" 2>/dev/null && echo yes)
for part in tests tutorials; do
  if [ $part = tests ]; then
    pick="not tutorial" more=${PYTEST_ARGS:-} per_test=${TEST_TIMEOUT_S:-240}
  else
    pick="tutorial" more=${TUTORIAL_ARGS:-} per_test=${TESTS_S:-300}
  fi
  [ -n "$has_timeout" ] && more="--timeout $per_test $more"
  # shellcheck disable=SC2086
  timeout "${TESTS_S:-300}" $py -m pytest -q -rA -m gpu $tests -k "$pick" $more -p no:cacheprovider \
    --basetemp "$basetemp-$part" --junitxml "$out/gpu-$part.xml" >"$out/gpu-$part.log" 2>&1 &
done
wait
echo "tests done" >>"$out/env.txt"

if [ -n "${BENCH-}" ] || [ -z "${BENCH+set}" ]; then
  # shellcheck disable=SC2086
  timeout "${BENCH_S:-600}" $py -m benchmarks.gpu --out "$out" ${BENCH:---only 7,8,9a --models 350M} >"$out/bench.log" 2>&1
  echo "bench: exit $?" >>"$out/env.txt"
fi

tail -3 "$out"/gpu-*.log "$out"/bench*.log 2>/dev/null
# At most 8 files come back from some machines: the small ones go into one archive.
{ find "$basetemp"-* /tmp/nexa_nb-workers-* nexa_runs notebooks/nexa_runs -mmin -120 -size -2M \
    \( -name '*.log' -o -name result.json -o -name events.jsonl -o -name '*.ipynb' \) 2>/dev/null
  ls "$out"/*.xml "$out"/bench-beside.log 2>/dev/null; } | tar czf "$out/logs.tgz" -T - 2>/dev/null
rm -f "$out"/*.xml "$out"/bench-beside.log
exit 0
