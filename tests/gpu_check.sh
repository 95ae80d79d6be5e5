#!/usr/bin/env bash
# Everything the open GPU work needs from a lent GPU machine, in as few device calls as possible.
#
# On this machine, once:   make device   (builds .device/, git-ignored: every runtime dependency
#                          the GPU image lacks, listed from pyproject.toml; until 2026-12-04 the
#                          recipe named PyNaCl alone, and `import rayledger` would have failed
#                          there for want of tomli-w)
# Then ONE device call, with carry [".device"] and timeout_s 600:
#   bash .device/setup.sh && bash tests/gpu_check.sh all        (steps capped at 470 s in all)
# A drawn task has 15 minutes of device time, the machine's start included, so "all" is sized
# to leave room for a start and the set-up. Given more time, the parts can run separately:
#   bash .device/setup.sh && bash tests/gpu_check.sh kernels    (steps capped at 570 s in all)
#   bash .device/setup.sh && bash tests/gpu_check.sh e2e        (steps capped at 480 s in all)
# Part "kernels": the gpu-marked tests, the same tests under compute-sanitizer (memcheck), and
# `rayledger bench kernels`. Part "e2e": `rayledger bench e2e` with 4 validators at 50,000
# offered tx/s, closed loop, and a ceiling run (--ceiling). "all": both, shorter (the e2e open loop only, 20 s of load).
# Each step's full output goes to $OUT/<step>.log; a summary of exit codes and times, then the
# tail of each log, is printed last (the reply keeps the tail).
set -uo pipefail
part=${1:-kernels}
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
summary="$out/summary.txt"
: >"$summary"

step() {  # step NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    printf '%-22s rc=%-3s %4ss\n' "$name" "$rc" "$((SECONDS - start))" | tee -a "$summary"
}

if command -v rayledger >/dev/null; then
    rl=(rayledger)
else
    rl=(python3 -c 'from rayledger.cluster.cli import main; main()')
fi

{ nvidia-smi -L; python3 -c 'import cupy; print("cupy", cupy.__version__)'; } >"$out/device.txt" 2>&1

# Everything the steps import, first: a package missing there costs seconds, not the budget
step imports 60 python3 -c 'import sys; import cupy, nacl, ray, hdrh, tomli_w
import rayledger.cluster.cli, rayledger.cluster.bench, rayledger.actors.validator
from rayledger.kernels import available_backends
print(sys.version, "ray", ray.__version__, "backends", available_backends())'
if ! tail -n 1 "$summary" | grep -q "rc=0 "; then
    cat "$out/imports.log" "$out/device.txt"
    echo "=== summary"
    cat "$summary"
    exit 3
fi

compile_step() {
    # Fails unless CuPy sees the device; times the cold compile of the kernel module.
    step compile "$1" python3 -c 'import time; t = time.time(); from rayledger.kernels import prepare
print(prepare("cuda"), "module compiled and loaded in %.1f s" % (time.time() - t))'
}

kernel_steps() {  # kernel_steps TESTS_S SANITIZER_S BENCH_S
    step gpu-tests "$1" python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels
    step sanitizer "$2" compute-sanitizer --tool memcheck --error-exitcode 99 \
        python3 -m pytest -q -p no:cacheprovider -m gpu -k "not large" \
        tests/kernels/test_hash_gpu.py tests/kernels/test_ed25519_gpu.py
    step bench-kernels "$3" "${rl[@]}" bench kernels
}

case "$part" in
all)
    compile_step 60
    kernel_steps 110 90 90
    step bench-e2e-open 120 "${rl[@]}" bench e2e --validators 4 --duration 20 \
        --rate 50000 --batch-rows 5000
    ;;
kernels)
    compile_step 120
    kernel_steps 150 150 150
    ;;
e2e)
    step bench-e2e-open 180 "${rl[@]}" bench e2e --validators 4 --duration 30 \
        --rate 50000 --batch-rows 5000
    step bench-e2e-closed 180 "${rl[@]}" bench e2e --validators 4 --duration 30
    # The pipeline's own limit on these 16 cores (curve math skipped): if the real run falls
    # short of 50,000, this says whether the GPU or the rest of the pipeline is the reason
    step bench-e2e-ceiling 120 "${rl[@]}" bench e2e --validators 4 --duration 20 \
        --rate 80000 --batch-rows 5000 --ceiling
    ;;
*)
    echo "unknown part $part (all, kernels or e2e)" >&2
    exit 2
    ;;
esac

for log in "$out"/*.log; do
    echo "=== $(basename "$log") (last lines)"
    tail -n 25 "$log"
done
cat "$out/device.txt"
echo "=== summary"
cat "$summary"
