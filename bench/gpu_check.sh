#!/usr/bin/env bash
# The first thing a session runs on a lent GPU machine: every GPU figure this project reports,
# in one script that finishes in under 8 minutes on one H200 (docs/benchmarks.md, "GPU check").
#
# Each stage runs in its own process under `timeout`, within one overall time budget, and is
# recorded as pass, skip (with the reason) or fail (with the reason); a failing stage never
# stops the later ones. The stages' work is in bench/gpu_check.py; this script only orders,
# times and logs them.
set -uo pipefail

usage() {
    cat <<'EOF'
usage: bash bench/gpu_check.sh [OUT_DIR] [--dry-run] [--cpu-smoke] [--only=STAGE,...] [--help]

Measures this project on a CUDA machine and writes to OUT_DIR (default: $OUT, else
runs/gpu_check):
  gpu_check.json   every figure, and each stage's status, reason and time
  gpu_check.md     the table to paste into docs/benchmarks.md
  gpu_check.log    everything the stages printed

Stages (each under `timeout`; a failure does not stop the later ones):
  1 wheels      install .whl/*.whl into /tmp/site (nltk, trl, gguf...; skipped without .whl/)
  2 env         torch/CUDA versions, GPU name and memory, package versions, data paths
  3 matmul      measured bf16 matmul peak (8192^3), TFLOP/s
  4 cuda_tests  the tests in tests/ that mention CUDA (pytest -k cuda)
  5 parity      our SmolLM vs transformers' LlamaForCausalLM at the real config, fp32 and bf16
  6 fastpath    shared-trunk fast path vs textbook path on a real HH batch, fp32 and bf16
  7 train       python -m dpo.train, 40 steps, bf16 autocast: tokens/s, peak CUDA memory, TFLOP/s
  8 dpo_step    python -m bench.dpo_step --device cuda against TRL (our side only without trl)
  9 generate    python -m bench.generate_speed --device cuda: smollm.generate against transformers'
                generate, fp32, greedy, batch 1 and 16, 128 new tokens (random weights)
 10 fsdp        torchrun -m bench.big_step --fsdp at SmolLM2-360M's config, activation checkpointing
                on and off: tokens/s and peak CUDA memory

Options:
  --dry-run     print each stage's command and time limit; run nothing
  --cpu-smoke   run every stage at a tiny size on CPU (tiny config, 2 steps): tests the plumbing
  --only=LIST   run only these stages (comma-separated; wheels and env always run), e.g. to
                rerun a failed one; the others are recorded as skipped
  -h, --help    this text

Exit code: 0 when every stage passed or was skipped for a stated reason, 1 when one failed,
2 for a usage error or a machine without CUDA (without --cpu-smoke).
Environment: PYTHON (default python3), GPU_CHECK_BUDGET (seconds for all stages; default 450,
or 300 with --cpu-smoke), GPU_CHECK_KEEP=1 keeps the scratch folder (checkpoints, runs).
EOF
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
PY=${PYTHON:-python3}
DRY=0
SMOKE=0
OUT_DIR=""
ONLY=""
STAGES=(wheels env matmul cuda_tests parity fastpath train dpo_step generate fsdp)
for arg in "$@"; do
    case $arg in
        -h | --help) usage; exit 0 ;;
        --dry-run) DRY=1 ;;
        --cpu-smoke) SMOKE=1 ;;
        --only=*)
            ONLY=,${arg#--only=},
            for name in ${ONLY//,/ }; do
                if [[ " ${STAGES[*]} " != *" $name "* ]]; then
                    echo "gpu_check: error: --only: no stage '$name' (stages: ${STAGES[*]})" >&2; exit 2
                fi
            done ;;
        -*) echo "gpu_check: error: unknown option $arg (see --help)" >&2; exit 2 ;;
        *)
            if [ -n "$OUT_DIR" ]; then
                echo "gpu_check: error: one OUT_DIR only, got '$OUT_DIR' and '$arg'" >&2; exit 2
            fi
            OUT_DIR=$arg ;;
    esac
done
OUT_DIR=${OUT_DIR:-${OUT:-runs/gpu_check}}
if [ -e "$OUT_DIR" ] && [ ! -d "$OUT_DIR" ]; then
    echo "gpu_check: error: OUT_DIR '$OUT_DIR' exists and is not a folder" >&2; exit 2
fi

# ------------------------------------------------------------------ sizes
if [ $SMOKE = 1 ]; then
    MODE=(--smoke)
    BUDGET=${GPU_CHECK_BUDGET:-300}
    TRAIN_FLAGS=(--max-steps 2 --batch-size 2 --max-length 128 --num-pairs 4 --eval-pairs 2 --train-last-n 2
                 --device cpu --dtype bfloat16)
    STEP_FLAGS=(--device cpu --reps 1 --warmup 1 --steps 1 --layers 2 --train-last-n 1 --max-length 64
                --batch-size 2)
else
    MODE=()
    BUDGET=${GPU_CHECK_BUDGET:-450}
    TRAIN_FLAGS=(--max-steps 40 --batch-size 8 --max-length 512 --num-pairs 320 --eval-pairs 32
                 --device cuda --dtype bfloat16)
    STEP_FLAGS=(--device cuda --reps 1 --warmup 2 --steps 3)
fi

# ------------------------------------------------------------------ stage runner
now() { echo "${EPOCHREALTIME:-$(date +%s.%N)}"; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

record() {  # NAME STATUS RC SECONDS LIMIT REASON: one line of WORK/status.tsv for the report
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "${6//$'\t'/ }" >>"$WORK/status.tsv"
}

STAGE_NO=0
run_stage() {  # NAME LIMIT CMD...: run CMD under timeout; status from its exit code (0 pass, 3 skip)
    local name=$1 limit=$2
    shift 2
    if [ -n "$ONLY" ] && [ "$name" != env ] && [ "$name" != wheels ] && [[ $ONLY != *",$name,"* ]]; then
        skip_stage "$name" "not selected (--only=${ONLY:1:-1})"
        return 0
    fi
    STAGE_NO=$((STAGE_NO + 1))
    # Keep 15 s for each stage still to come, so that the whole script ends within the budget.
    local spent=${SECONDS} left
    left=$((BUDGET - (spent - T0) - 15 * (${#STAGES[@]} - STAGE_NO)))
    ((limit > left)) && limit=$left
    if [ $DRY = 1 ]; then
        local cmd
        cmd=$(printf '%q ' "$@")
        printf '%2d %-10s (timeout %s s)  %s\n' "$STAGE_NO" "$name" "$limit" "${cmd% }"
        return 0
    fi
    echo
    echo "=== [$STAGE_NO/${#STAGES[@]}] $name (timeout ${limit} s): $(printf '%q ' "$@")"
    if ((limit < 10)); then
        echo "not run: the ${BUDGET} s budget is spent"
        record "$name" fail "" 0 "$limit" "not run: the ${BUDGET} s budget was spent by the stages before it"
        return 0
    fi
    local start rc status reason
    start=$(now)
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$WORK/$name.log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status=pass reason="" ;;
        3) status=skip reason="" ;;
        124 | 137) status=fail reason="timed out after ${limit} s" ;;
        *) status=fail reason="exit code $rc: $(grep -v '^\s*$' "$WORK/$name.log" | tail -n 1 | cut -c1-300)" ;;
    esac
    record "$name" "$status" "$rc" "$(elapsed "$start")" "$limit" "$reason"
    echo "=== $name: $status${reason:+ ($reason)}"
}

skip_stage() {  # NAME REASON: a stage that is not run, for a stated reason
    STAGE_NO=$((STAGE_NO + 1))
    if [ $DRY = 1 ]; then
        printf '%2d %-10s skipped: %s\n' "$STAGE_NO" "$1" "$2"
    else
        echo
        echo "=== [$STAGE_NO/${#STAGES[@]}] $1: skip ($2)"
        record "$1" skip 0 0 0 "$2"
    fi
}

# ------------------------------------------------------------------ the stages
stages() {
    T0=$SECONDS
    local wheels=(.whl/*.whl)
    if [ $SMOKE = 1 ]; then
        skip_stage wheels "--cpu-smoke uses this machine's packages"
    elif [ ! -e "${wheels[0]}" ]; then
        skip_stage wheels "no .whl/*.whl here (bench/fetch_gpu_wheels.sh makes them): nltk, trl, gguf as installed"
    else
        run_stage wheels 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site "${wheels[@]}"
        if [ $DRY = 0 ] && [ "$(tail -n 1 "$WORK/status.tsv" | cut -f2)" = pass ]; then
            export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
            printf '{"status": "pass", "summary": "%s"}\n' \
                "installed into /tmp/site: $(cd .whl && ls -- *.whl | sed 's/-py[23].*//' | paste -sd' ')" \
                >"$WORK/wheels.json"
        fi
    fi
    # Where the data is: dpo/bundled (HH-RLHF, NLTK) and .whl/data (the tokenizer); nothing to export.
    eval "$("$PY" -m bench.gpu_check paths --shell)"
    [ $DRY = 1 ] && "$PY" -m bench.gpu_check paths | sed 's/^/  /'
    export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 SMOLLM_OFFLINE=1
    local common=(--work "$WORK" ${MODE[@]+"${MODE[@]}"})
    run_stage env 60 "$PY" -m bench.gpu_check env "${common[@]}"
    run_stage matmul 60 "$PY" -m bench.gpu_check matmul "${common[@]}"
    run_stage cuda_tests 120 "$PY" -m bench.gpu_check pytest "${common[@]}"
    run_stage parity 120 "$PY" -m bench.gpu_check parity "${common[@]}"
    run_stage fastpath 120 "$PY" -m bench.gpu_check fastpath "${common[@]}"
    run_stage train 210 "$PY" -m bench.gpu_check train "${common[@]}" -- "${TRAIN_FLAGS[@]}"
    run_stage dpo_step 240 "$PY" -m bench.gpu_check dpo-step "${common[@]}" -- "${STEP_FLAGS[@]}"
    run_stage generate 120 "$PY" -m bench.gpu_check generate "${common[@]}"
    run_stage fsdp 120 "$PY" -m bench.gpu_check fsdp "${common[@]}"
}

if [ $DRY = 1 ]; then
    WORK=/tmp/gpu_check.XXXXXX  # made by mktemp in a real run
    echo "gpu_check: dry run ($([ $SMOKE = 1 ] && echo 'CPU smoke' || echo GPU)); nothing is run." \
        "Output: $OUT_DIR; budget ${BUDGET} s for all stages."
    stages
    echo "then: $PY -m bench.gpu_check report --work $WORK --out $OUT_DIR${MODE[*]:+ ${MODE[*]}}"
    exit 0
fi

if [ $SMOKE = 0 ]; then
    cuda=$("$PY" -c 'import torch; print(torch.cuda.is_available())' 2>&1 | tail -n 1)
    if [ "$cuda" = False ]; then
        echo "gpu_check: error: no CUDA device here (torch.cuda.is_available() is False); run this on the GPU" \
            "machine, or add --cpu-smoke to test the plumbing on CPU at a tiny size" >&2
        exit 2
    elif [ "$cuda" != True ]; then
        echo "gpu_check: error: cannot import torch with $PY: $cuda" >&2
        exit 2
    fi
fi

if ! mkdir -p "$OUT_DIR" 2>/dev/null || [ ! -w "$OUT_DIR" ]; then
    echo "gpu_check: error: cannot write to OUT_DIR '$OUT_DIR'" >&2; exit 2
fi
OUT_DIR=$(cd "$OUT_DIR" && pwd)
rm -f "$OUT_DIR/gpu_check.json" "$OUT_DIR/gpu_check.md"  # a stale report must not pass for this run's
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
[ "${GPU_CHECK_KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
: >"$WORK/status.tsv"

main() {
    echo "gpu_check: $(date -u "+%Y-%m-%d %H:%M:%S UTC") on $(hostname 2>/dev/null || uname -n), commit" \
        "$(git rev-parse --short HEAD 2>/dev/null || echo unknown); mode $([ $SMOKE = 1 ] && echo cpu-smoke || echo gpu);" \
        "output $OUT_DIR; scratch $WORK; budget ${BUDGET} s"
    stages
    echo
    timeout 60 "$PY" -m bench.gpu_check report --work "$WORK" --out "$OUT_DIR" ${MODE[@]+"${MODE[@]}"}
    local rc=$?
    if ((rc != 0 && rc != 1)); then
        echo "gpu_check: error: the report could not be written (exit code $rc); stage results:"
        cat "$WORK/status.tsv"
        return 1
    fi
    return $rc
}

main 2>&1 | tee "$OUT_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
