#!/usr/bin/env bash
# The GPU measurements of issue 11 in one go: one process per part, each writing JSON under
# $OUT (default out/gpu), a status for each and a summary. One part failing or timing out never
# stops the others; its JSON then says why ("run.status", "error", the end of its log).
#
#   preflight  package versions; the official package imports on this jax; the GPU benchmarks
#              import neither ray nor the pipeline                             -> preflight.json
#   engine     benchmarks.gpu_engine: 2B bf16 at 64/128/256 slots, 512-token prompts, 256 new
#              tokens: tokens/s and fraction of the roofline (target >= 40% at 128) -> engine.json
#   reference  benchmarks.gpu_reference: the same 2B workload, 64 requests, through our Engine,
#              the official recurrentgemma Sampler (jax) and HF generate (torch, CUDA) on the same
#              random weights: useful tokens/s, ratios (target ours >= 3x official)
#                                                                              -> reference.json
#   numerics   benchmarks.gpu_numerics: bf16 against float32 logits, 2B shapes, 4 prompts x 32
#              tokens + 32 greedy steps: max/mean |diff|, greedy agreement      -> numerics.json
#   engine9b   benchmarks.gpu_engine --preset 9b: 9B bf16 at 64 slots            -> engine9b.json
#   host       benchmarks.engine_host: host us per request / decode step and the share of time
#              the device waits on the host (tiny model, 128 and 256 slots), the sampling step
#              at [128, 256000]; each against the 7da69c4 engine when git has that commit
#              (HOST_BASELINE_REF; else ours only, said in the log)            -> host.json
#   summary    every part's status and key figures (also printed at the end)     -> summary.json
#
# Usage:
#   bash benchmarks/gpu_all.sh                 # the GPU machine: python3 with jax[cuda], torch
#   bash benchmarks/gpu_all.sh --cpu-small     # (or SMALL=1) every part at a toy size, on CPU
# The device command, with a device timeout of ~540 s (the script stops itself by 495 s + grace):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && bash benchmarks/gpu_all.sh
# .whl/ holds pure-Python wheels of what the machine lacks: recurrentgemma 1.0.1 and
# typeguard 2.13.3 (recurrentgemma needs typeguard < 3), and jaxtyping, wadler-lindig and einops
# unless the machine has them (preflight.json lists the packages it finds).
#
# Settings (environment): OUT; PYTHON (default python3); PARTS (comma-separated subset of
# preflight,engine,reference,numerics,engine9b,host); the sizes below (ENGINE_SLOTS, PROMPT_LEN, ...);
# BUDGET_S and the caps CAP_<PART>; JAX_COMPILATION_CACHE_DIR (default /tmp/rg-batch-jax-cache).
#
# Time budget. The session gets 15 minutes of device time, machine start included, so this script
# must finish in under 9 minutes. The parts' caps add up to BUDGET_S = 495 s (8.25 min); a part
# may also use what the parts before it left unused: its limit is the budget left minus the caps
# of the parts after it, so the whole never passes BUDGET_S (+10 s of kill grace per part on a
# hang). Compiles dominate every part: XLA unrolls the 26 (2B) or 38 (9B) blocks, and on this
# repo's 2-core CPU the 2B decode step compiles in ~16 s and a [32, 512] prefill in ~37 s; a GPU
# compile (with GEMM autotuning) is taken to be of that order. The timed work is small beside it
# (H200: ~4.8 TB/s, ~1 PFLOP/s bf16 dense):
#   preflight  20 s: package metadata and imports only (no device touched).
#   engine    135 s: 7 compiles (one prefill [32, 512]; an insert and a decode per slot count).
#              Per slot count, twice (best of 2): prefill 2 x slots x 512 tokens x 5.4 GFLOP
#              (~1-3 s at 256 slots) and 256 decode steps of 1.5-5 ms (bytes: 5.4 GB of weights
#              + slots x 17 MB of cache per step); random weights and the bandwidth / matmul probes
#              take a few seconds.
#   reference 140 s: ours reuses engine's 64-slot executables (JAX_COMPILATION_CACHE_DIR, shared
#              by every part), so it runs two passes of ~2 s; the official sampler compiles twice
#              (prompt processing, the sampling while-loop) and runs two passes; HF: 5.4 GB of
#              weights to host and a temporary file (~10 s), a child process (torch import, model
#              build ~15 s), two generate passes of 256 steps at ~20-40 ms a step (HF steps layer
#              by layer from Python), ~10 s each. 64 requests keep all of it in one batch each.
#   numerics   55 s: two compiles of a one-token step (float32 at "highest" matmul precision,
#              not TF32; bf16), 2B float32 weights (10.7 GB) made on the device, 3 x 63 steps of
#              a few ms.
#   engine9b  100 s: 3 compiles of the 38-block model, 17 GB of weights (+ the fused copy the
#              Engine makes), 64 slots: prefill 64 x 512 x 17 GFLOP (~1 s) and 256 decode steps of
#              ~4-8 ms, twice. 256 new tokens fit; NEW_TOKENS_9B=128 halves the decode.
#   host       45 s: the tiny model (compiles in seconds) at 4 sizes, ours and the baseline,
#              and 4 sampling settings x 2 compiles at [128, 256000]. Last, so that it only
#              takes what the 2B and 9B parts leave.
set -u -o pipefail

cd "$(dirname "$0")/.."
SMALL=${SMALL:-0}
for arg in "$@"; do
  case $arg in
    --cpu-small | --small) SMALL=1 ;;
    -h | --help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_all.sh: unknown argument $arg (try --help)" >&2; exit 2 ;;
  esac
done
[[ $SMALL == 0 || $SMALL == 1 ]] || { echo "gpu_all.sh: SMALL must be 0 or 1" >&2; exit 2; }

OUT=${OUT:-out/gpu}
PY=${PYTHON:-python3}
PARTS=${PARTS:-preflight,engine,reference,numerics,engine9b,host}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/rg-batch-jax-cache}

if [[ $SMALL == 1 ]]; then
  # Toy model (width 128, 3 blocks, vocab 512; benchmarks/gpu_engine.py small_config), sizes
  # chosen so that engine, reference (ours) and engine9b share executables through the cache.
  SIZE_FLAG=--cpu-small
  : "${ENGINE_SLOTS:=4,8}" "${PROMPT_LEN:=32}" "${NEW_TOKENS:=16}"
  : "${PREFILL_BATCH:=4}" "${PREFILL_CHUNK:=32}" "${DECODE_STEPS:=4}"
  : "${REF_REQUESTS:=4}" "${REF_NEW_TOKENS:=8}"
  : "${NUMERICS_PROMPTS:=2}" "${NUMERICS_PROMPT_LEN:=8}" "${NUMERICS_STEPS:=8}"
  : "${SLOTS_9B:=4}" "${NEW_TOKENS_9B:=16}"
  # No time target on CPU: the caps only stop a hang (a loaded 2-core machine is slow).
  : "${CAP_PREFLIGHT:=60}" "${CAP_ENGINE:=300}" "${CAP_REFERENCE:=300}"
  : "${CAP_NUMERICS:=150}" "${CAP_ENGINE9B:=150}" "${CAP_HOST:=300}"
  HOST_ARGS=(--small)
  : "${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:=0}"
  export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS
else
  SIZE_FLAG=
  : "${ENGINE_SLOTS:=64,128,256}" "${PROMPT_LEN:=512}" "${NEW_TOKENS:=256}"
  : "${PREFILL_BATCH:=32}" "${PREFILL_CHUNK:=512}" "${DECODE_STEPS:=16}"
  : "${REF_REQUESTS:=64}" "${REF_NEW_TOKENS:=256}"
  : "${NUMERICS_PROMPTS:=4}" "${NUMERICS_PROMPT_LEN:=32}" "${NUMERICS_STEPS:=32}"
  : "${SLOTS_9B:=64}" "${NEW_TOKENS_9B:=256}"
  : "${CAP_PREFLIGHT:=20}" "${CAP_ENGINE:=135}" "${CAP_REFERENCE:=140}"
  : "${CAP_NUMERICS:=55}" "${CAP_ENGINE9B:=100}" "${CAP_HOST:=45}"
  HOST_ARGS=()
fi
ENGINE_ARGS=(--prefill-batch "$PREFILL_BATCH" --prefill-chunk "$PREFILL_CHUNK"
  --decode-steps "$DECODE_STEPS")

HOST_BASELINE_REF=${HOST_BASELINE_REF:-7da69c4}
if git cat-file -e "$HOST_BASELINE_REF^{commit}" 2>/dev/null; then
  HOST_ARGS+=(--baseline-ref "$HOST_BASELINE_REF")
else
  HOST_ARGS+=(--no-baseline)
fi

ALL_PARTS=(preflight engine reference numerics engine9b host)
declare -A CAP=([preflight]=$CAP_PREFLIGHT [engine]=$CAP_ENGINE [reference]=$CAP_REFERENCE
  [numerics]=$CAP_NUMERICS [engine9b]=$CAP_ENGINE9B [host]=$CAP_HOST)
SELECTED=()
for part in "${ALL_PARTS[@]}"; do
  [[ ",$PARTS," == *",$part,"* ]] && SELECTED+=("$part")
done
for part in ${PARTS//,/ }; do
  [[ -v "CAP[$part]" ]] || { echo "gpu_all.sh: unknown part $part" >&2; exit 2; }
done
TOTAL_CAPS=0
for part in "${SELECTED[@]}"; do TOTAL_CAPS=$((TOTAL_CAPS + CAP[$part])); done
BUDGET_S=${BUDGET_S:-$TOTAL_CAPS}

mkdir -p "$OUT" "$JAX_COMPILATION_CACHE_DIR"
T0=$SECONDS
say() { printf '[gpu-all %4ds] %s\n' $((SECONDS - T0)) "$*"; }
say "out $OUT; small $SMALL; parts ${SELECTED[*]}; budget ${BUDGET_S} s; python $PY"
say "jax compilation cache $JAX_COMPILATION_CACHE_DIR ($(ls "$JAX_COMPILATION_CACHE_DIR" | wc -l) entries)"

# run_part NAME COMMAND...: runs COMMAND --json $OUT/NAME.json under its time limit, logs to
# $OUT/NAME.log, then records its status in the JSON (writing one if the part wrote none).
run_part() {
  local name=$1 later=0 after=0 p
  shift
  for p in "${SELECTED[@]}"; do
    ((after)) && later=$((later + CAP[$p]))
    [[ $p == "$name" ]] && after=1
  done
  local limit=$((BUDGET_S - (SECONDS - T0) - later))
  local json="$OUT/$name.json" log="$OUT/$name.log" start=$SECONDS rc
  rm -f "$json"
  local extra=()
  if ((limit < 10)); then
    say "part $name: skipped, no time left"
    echo "skipped: no time left in the budget" >"$log"
    rc=-1
  else
    # The reference part stops its HF child itself, before this limit, to keep what it has.
    [[ $name == reference ]] && extra=(--budget-s $((limit - 15)))
    say "part $name: start (limit ${limit} s): $* ${extra[*]}"
    timeout --kill-after=10 "$limit" "$@" "${extra[@]}" --json "$json" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
  fi
  "$PY" -m benchmarks.gpu_report record --json "$json" --part "$name" --rc="$rc" \
    --seconds $((SECONDS - start)) --limit "$limit" --log "$log" || say "record failed for $name"
}

for part in "${SELECTED[@]}"; do
  case $part in
    preflight) run_part preflight "$PY" -m benchmarks.gpu_report preflight ;;
    engine)
      run_part engine "$PY" -m benchmarks.gpu_engine $SIZE_FLAG --preset 2b \
        --slots "$ENGINE_SLOTS" --prompt-len "$PROMPT_LEN" --new-tokens "$NEW_TOKENS" \
        "${ENGINE_ARGS[@]}"
      ;;
    reference)
      run_part reference "$PY" -m benchmarks.gpu_reference $SIZE_FLAG --preset 2b \
        --requests "$REF_REQUESTS" --prompt-len "$PROMPT_LEN" --new-tokens "$REF_NEW_TOKENS" \
        "${ENGINE_ARGS[@]}"
      ;;
    numerics)
      run_part numerics "$PY" -m benchmarks.gpu_numerics $SIZE_FLAG --preset 2b \
        --prompts "$NUMERICS_PROMPTS" --prompt-len "$NUMERICS_PROMPT_LEN" \
        --steps "$NUMERICS_STEPS"
      ;;
    engine9b)
      run_part engine9b "$PY" -m benchmarks.gpu_engine $SIZE_FLAG --preset 9b \
        --slots "$SLOTS_9B" --prompt-len "$PROMPT_LEN" --new-tokens "$NEW_TOKENS_9B" \
        "${ENGINE_ARGS[@]}"
      ;;
    host)
      [[ " ${HOST_ARGS[*]} " == *" --no-baseline "* ]] &&
        say "part host: git has no commit $HOST_BASELINE_REF here: ours only, no baseline"
      run_part host "$PY" -m benchmarks.engine_host "${HOST_ARGS[@]}"
      ;;
  esac
done

"$PY" -m benchmarks.gpu_report summary --out "$OUT" --parts "$(IFS=,; echo "${SELECTED[*]}")" \
  --total-s $((SECONDS - T0)) --small "$SMALL"
say "done"
