#!/usr/bin/env bash
# GPU-host check: environment, `python -m fla_cuda info`, the whole test suite (gpu tests
# included), then the benchmark. Everything is tee'd to OUTDIR/log.
#
#   scripts/gpu_check.sh OUTDIR [--sanitize] [--full] [--skip-tests] [--skip-bench] [-- BENCH ARGS...]
#
#   --sanitize     also run the gpu-marked tests (a small-shape subset, -k "$SANITIZE_K") under
#                  compute-sanitizer (--tool "$SANITIZE_TOOL", default memcheck); report in
#                  OUTDIR/sanitizer.log; a sanitizer error makes the exit status non-zero
#   --full         bench without --quick (FLA for every op: many minutes of Triton autotuning)
#   --skip-tests / --skip-bench   run only part (the device runner allows 10 min per command)
#   -- ARGS        extra arguments for bench/bench.py (e.g. -- --ops chunk_gla --modes fwd)
#
# Environment: BENCH_TIMEOUT (s, default 420), SANITIZE_K, SANITIZE_TOOL, SANITIZE_TIMEOUT (s, 1200),
# PYTEST_ARGS (extra pytest arguments), FLA_CUDA_COMMIT (recorded in the bench rows when the
# tree has no .git).
#
# Exit status: non-zero if the tests failed (pytest rc other than 0 / 5 "no tests"), the bench
# failed, or the sanitizer found errors; the bench runs even when tests fail.
set -u -o pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
    sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
OUTDIR=$1
shift
SANITIZE=0 QUICK=--quick RUN_TESTS=1 RUN_BENCH=1
BENCH_ARGS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --sanitize) SANITIZE=1 ;;
        --full) QUICK= ;;
        --skip-tests) RUN_TESTS=0 ;;
        --skip-bench) RUN_BENCH=0 ;;
        --) shift; BENCH_ARGS=("$@"); break ;;
        *) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done

mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2

section() { printf '\n===== %s (%s, +%ss) =====\n' "$1" "$(date -u +%H:%M:%S)" "$SECONDS"; }

main() {
    local tests_rc=0 bench_rc=0 san_rc=0 rc
    PY=${PYTHON:-python}

    section "setup"
    echo "repo: $ROOT   out: $OUTDIR   host: $(hostname)"
    if [[ -d .whl && ! -d .fla_site ]]; then
        echo "installing $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')into .fla_site"
        rm -rf .fla_site.tmp
        if "$PY" -m pip install --no-index --no-deps --quiet --target .fla_site.tmp .whl/*.whl; then
            mv .fla_site.tmp .fla_site
        else
            echo "WARNING: installing .whl/*.whl failed: FLA baselines will be missing"
            rm -rf .fla_site.tmp
        fi
    fi
    export PYTHONPATH="$ROOT:$ROOT/.fla_site${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1
    if [[ -z "${FLA_CUDA_COMMIT:-}" ]] && git -C "$ROOT" rev-parse HEAD >/dev/null 2>&1; then
        FLA_CUDA_COMMIT=$(git -C "$ROOT" rev-parse --short=12 HEAD)
        git -C "$ROOT" diff --quiet HEAD 2>/dev/null || FLA_CUDA_COMMIT="$FLA_CUDA_COMMIT-dirty"
        export FLA_CUDA_COMMIT
    fi
    echo "PYTHONPATH=$PYTHONPATH  commit=${FLA_CUDA_COMMIT:-unknown}"

    section "nvidia-smi"
    nvidia-smi || echo "(nvidia-smi failed)"
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu \
        --format=csv 2>/dev/null || true

    section "versions"
    "$PY" - <<'EOF'
import importlib, platform, sys
import torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
          f"{p.total_memory / 2**30:.1f} GiB")
for m in ("triton", "fla", "einops", "numpy", "pytest", "matplotlib", "fla_cuda"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"), getattr(mod, "__file__", ""))
    except Exception as e:
        print(m, "NOT AVAILABLE:", type(e).__name__, e)
EOF
    command -v nvcc >/dev/null && nvcc --version | tail -n 2

    section "python -m fla_cuda info"
    "$PY" -m fla_cuda info; rc=$?
    [[ $rc -ne 0 ]] && echo "(fla_cuda info exited $rc)"

    if [[ $RUN_TESTS -eq 1 ]]; then
        section "pytest tests/"
        # shellcheck disable=SC2086
        "$PY" -m pytest tests/ -q -rs --durations=15 --junitxml="$OUTDIR/pytest.xml" ${PYTEST_ARGS:-}
        tests_rc=$?
        if [[ $tests_rc -eq 5 ]]; then tests_rc=0; fi    # 5: nothing collected
        echo "pytest exit status: $tests_rc"
        [[ -f "$OUTDIR/pytest.xml" ]] && "$PY" scripts/junit_summary.py "$OUTDIR/pytest.xml" "$OUTDIR/tests.json"
    fi

    if [[ $RUN_BENCH -eq 1 ]]; then
        section "bench ${QUICK:-(full)} ${BENCH_ARGS[*]:-}"
        timeout -k 30 "${BENCH_TIMEOUT:-420}" \
            "$PY" bench/bench.py $QUICK --out "$OUTDIR/bench" "${BENCH_ARGS[@]}"
        bench_rc=$?
        [[ $bench_rc -eq 124 ]] && echo "bench hit BENCH_TIMEOUT=${BENCH_TIMEOUT:-420}s (partial rows in $OUTDIR/bench/results.json)"
        echo "bench exit status: $bench_rc"
    fi

    if [[ $SANITIZE -eq 1 ]]; then
        local tool=${SANITIZE_TOOL:-memcheck}
        local k=${SANITIZE_K:-not fla and not compile and not opcheck and not long_sequence and not 2049}
        section "compute-sanitizer --tool $tool (gpu tests, -k '$k')"
        local cs
        cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
        if [[ -x "$cs" ]]; then
            # No caching allocator: out-of-bounds accesses then hit real allocation boundaries.
            PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 30 "${SANITIZE_TIMEOUT:-1200}" \
                "$cs" --tool "$tool" --report-api-errors no --print-limit 200 --error-exitcode 99 \
                --log-file "$OUTDIR/sanitizer.log" \
                "$PY" -m pytest tests/ -m gpu -k "$k" -q -rs -p no:cacheprovider \
                --junitxml="$OUTDIR/sanitizer-pytest.xml"
            san_rc=$?
            if [[ $san_rc -eq 5 ]]; then san_rc=0; fi
            echo "compute-sanitizer exit status: $san_rc (99: $tool errors; report: $OUTDIR/sanitizer.log)"
            grep -E "ERROR SUMMARY|Invalid|out of bounds" "$OUTDIR/sanitizer.log" | head -20
        else
            echo "compute-sanitizer not found"
            san_rc=3
        fi
    fi

    section "summary"
    echo "tests rc=$tests_rc  bench rc=$bench_rc  sanitizer rc=$san_rc  elapsed ${SECONDS}s"
    echo "outputs: $(ls "$OUTDIR" | tr '\n' ' ')"
    [[ $tests_rc -eq 0 && $bench_rc -eq 0 && $san_rc -eq 0 ]]
}

main 2>&1 | tee "$OUTDIR/log"
exit "${PIPESTATUS[0]}"
