#!/usr/bin/env bash
# The GPU benchmark in one command, sized to finish within BUDGET (9 minutes) on one H100/H200:
#
#   bash scripts/gpu_bench.sh                          # GPU box: gpt2, B=64, T=1024, bf16; logs + JSON in ./bench-out
#   OUT=/tmp/b DEVICE=cpu PRESET=tiny bash scripts/gpu_bench.sh   # the same stages on a CPU, as a smoke test
#
# Stages (each its own process under `timeout`, so one hang or crash costs only its own slot), run in the order
# STAGES names them (default "main loss candidates confirm autotune tuned": the fast stages first, so confirm can
# still measure a winning candidate before autotune, the slowest and least stable, takes what is left; env always
# runs first; a stage that would start with less than 20 s of BUDGET left is skipped, and says so; until confirm
# has run, CONFIRM_RESERVE seconds of the budget are kept for it):
#   env         torch/CUDA versions, nvidia-smi
#   main        matmul peak; (a) the trainer's step vs (b) plain eager, ratio, MFU, memory, and where (a)'s GPU time
#               goes (--profile: kernel time by category, top kernels); (a) with the real loader on a generated shard;
#               eval + sampling + HellaSwag cost and recompiles after warm-up (TORCH_LOGS=recompiles prints any reason);
#               checkpoint stall of model + AdamW; numerics (a) vs (b)
#   loss        the output layer and its loss alone (scripts/bench_loss.py): full logits against the fused, chunked
#               loss in chunks of LOSS_CHUNKS rows; the loss kernels' time as passes over the logits
#   candidates  the loss's other settings beside the default (chunks of 8192 rows, fused with the output layer):
#               (a) with full logits (ce_chunk_tokens=0) and (a) in chunks of CE_CHUNK rows (default 65536, one
#               chunk of the whole micro-batch), each against main's (a); profiled
#   tuned       (a) with compile mode "tuned" (Inductor's coordinate-descent tuning of its own kernels; slow to
#               compile)
#   variants    (opt-in) (a) with FlashAttention-2 first instead of torch's order (cuDNN's attention on an H100/H200
#               with torch >= 2.11), with build-nanogpt's fp32 residual stream instead of the default bf16 one,
#               micro-batch MB_VARIANT (same tokens per step), and without the DDP wrapper; profiled, so each lists
#               the attention kernels that ran
#   confirm     the fastest run so far whose numerics held, if it beat main's (a) by 1 % or more
#               (scripts/bench_summary.py --winner-sets), measured again before it becomes a default: matmul
#               peak, (a) with those settings beside (b) plain eager, ratio, MFU, numerics, in one process. Skipped
#               (and says so) when nothing beat the defaults.
#   autotune    (slow to compile) compile mode "autotune": max-autotune-no-cudagraphs (whose GEMM autotuning can
#               crash, a Triton GEMM template faulting the GPU) with every GEMM candidate timed in a child process
# Every variant is checked against main's (b) losses (numerics). Last, scripts/bench_summary.py puts every stage's
# runs in one table against main's (a) (tok/s, as each stage measures its own peak) and names the fastest.
# docs/BENCHMARKS.md has the figures these stages measured.
# Environment: OUT (default ./bench-out), DEVICE (cuda), PRESET (gpt2), STAGES, PYTHON (default
# /opt/torch/.venv/bin/python3, else .venv/bin/python, else python3), BUDGET seconds for all stages (default 540),
# BENCH_ARGS extra bench_train.py flags for every stage, MB_VARIANT the micro-batch variant (default 32; 4 on CPU),
# CE_CHUNK the candidates' other chunking (default 65536; 48 on CPU), LOSS_CHUNKS the loss stage's chunkings
# (default 0,8192,65536; 0,48,65536 on CPU).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-./bench-out}
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-gpt2}
BUDGET=${BUDGET:-540}
STAGES=${STAGES:-main loss candidates confirm autotune tuned}
CONFIRM_RESERVE=${CONFIRM_RESERVE:-150}
case " $STAGES " in *" confirm "*) RESERVE=$CONFIRM_RESERVE ;; *) RESERVE=0 ;; esac
if [ -z "${PYTHON:-}" ]; then
    if [ -x /opt/torch/.venv/bin/python3 ]; then PYTHON=/opt/torch/.venv/bin/python3
    elif [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python
    else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
: > "$OUT/stages.txt"

ARGS=(--preset "$PRESET" --device "$DEVICE" --steps 20 --warmup 3)
if [ "$DEVICE" = cpu ]; then
    # CPU: a smoke test of every stage, not a measurement; bf16 autocast as on a GPU, so every setting applies.
    ARGS+=(--quick --dtype bfloat16)
    MB_VARIANT=${MB_VARIANT:-4}
    CE_CHUNK=${CE_CHUNK:-48}  # several chunks and a short last one in a micro-batch of 4 x 32 rows
    LOSS_CHUNKS=${LOSS_CHUNKS:-0,48,65536}
    # A vocabulary of 1024: at GPT-2's 50,304 the output layer's bf16 matmuls take most of a CPU's time here.
    LOSS_ARGS=(--rows 200 --dim 32 --vocab 1024 --steps 2 --warmup 1)
fi
MB_VARIANT=${MB_VARIANT:-32}
CE_CHUNK=${CE_CHUNK:-65536}
LOSS_CHUNKS=${LOSS_CHUNKS:-0,8192,65536}
# shellcheck disable=SC2206  # BENCH_ARGS is meant to be split into words
ARGS+=(${BENCH_ARGS:-})

T_START=$(date +%s)
# stage NAME LIMIT_SECONDS [ENV=VALUE...] -- ARGS...: run "$PYTHON ARGS" with at most LIMIT seconds (and never past
# BUDGET, less the RESERVE still kept for the confirm stage).
stage() {
    local name=$1 limit=$2 envs=()
    shift 2
    while [ "$1" != "--" ]; do envs+=("$1"); shift; done
    shift
    local left=$(( BUDGET - ($(date +%s) - T_START) - RESERVE ))
    if [ "$left" -lt 20 ]; then
        echo "== $name: skipped (under 20 s left of the ${BUDGET}s budget$([ "$RESERVE" -gt 0 ] && echo " once ${RESERVE}s are kept for confirm"))" \
            | tee -a "$OUT/stages.txt"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit}s): $PYTHON $*"
    local t0 rc
    t0=$(date +%s)
    rm -f "$OUT/$name.json"  # a JSON left by an earlier run must not pass for this one's (the summary reads them)
    env "${envs[@]}" timeout -k 10 "$limit" "$PYTHON" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    local what=ok
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && what="TIMED OUT"
    [ "$rc" -ne 0 ] && [ "$what" = ok ] && what="FAILED"
    echo "== $name: $what (rc $rc) in $(( $(date +%s) - t0 ))s" | tee -a "$OUT/stages.txt"
    # The report (everything after the progress lines); the whole log is in $OUT/$name.log.
    sed -n '/^device /,$p' "$OUT/$name.log"
    [ "$rc" -ne 0 ] && tail -n 15 "$OUT/$name.log"
}

stage env 60 -- -c "
import platform, torch
print('python', platform.python_version(), '| torch', torch.__version__, '| cuda', torch.version.cuda, '| cudnn',
      torch.backends.cudnn.version(), '| available', torch.cuda.is_available())  # cuDNN > 9.15 on sm90: attention runs cuDNN
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print('gpu', p.name, f'{p.total_memory / 2**30:.1f} GiB', 'SMs', p.multi_processor_count)
"
cat "$OUT/env.log"
command -v nvidia-smi >/dev/null && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

# main's JSON first: the summary compares every run with its (a)
jsons=("$OUT/main.json")
for name in $STAGES; do
    case $name in
        main) stage main 220 TORCH_LOGS=recompiles -- scripts/bench_train.py "${ARGS[@]}" --profile --json "$OUT/main.json" ;;
        loss) stage loss 120 -- scripts/bench_loss.py --device "$DEVICE" --chunks "$LOSS_CHUNKS" ${LOSS_ARGS[@]+"${LOSS_ARGS[@]}"} \
            --json "$OUT/loss.json" ;;
        candidates) stage candidates 160 -- scripts/bench_train.py "${ARGS[@]}" --runs "" --profile --compare-json "$OUT/main.json" \
            --json "$OUT/candidates.json" --variant "full:ce_chunk_tokens=0" --variant "ce${CE_CHUNK}:ce_chunk_tokens=${CE_CHUNK}" ;;
        tuned) stage tuned 240 -- scripts/bench_train.py "${ARGS[@]}" --runs "" --profile --compare-json "$OUT/main.json" \
            --json "$OUT/tuned.json" --variant "tuned:compile_mode=tuned" ;;
        variants) stage variants 200 -- scripts/bench_train.py "${ARGS[@]}" --runs "" --profile --compare-json "$OUT/main.json" \
            --json "$OUT/variants.json" --variant "flash:sdpa_backend=flash" --variant "fp32res:residual_dtype=float32" \
            --variant "mb${MB_VARIANT}:micro_batch=${MB_VARIANT}" --variant "noddp:ddp=0" ;;
        confirm)
            RESERVE=0
            # shellcheck disable=SC2207  # the --set arguments are single words
            win=($("$PYTHON" scripts/bench_summary.py --winner-sets "${jsons[@]}" 2>/dev/null))
            if [ ${#win[@]} -eq 0 ]; then
                rm -f "$OUT/confirm.json"
                echo "== confirm: ok (nothing to confirm: no run beat main's (a) by 1 % or more with its numerics held)" | tee -a "$OUT/stages.txt"
            else
                stage confirm 200 -- scripts/bench_train.py "${ARGS[@]}" "${win[@]}" --runs a,b --json "$OUT/confirm.json"
            fi ;;
        autotune) stage autotune 240 -- scripts/bench_train.py "${ARGS[@]}" --runs "" --profile --compare-json "$OUT/main.json" \
            --json "$OUT/autotune.json" --variant "autotune:compile_mode=autotune" ;;
        *) echo "== $name: unknown stage (STAGES takes main loss candidates tuned variants confirm autotune)" | tee -a "$OUT/stages.txt" ;;
    esac
    case $name in candidates|tuned|variants|autotune|confirm) jsons+=("$OUT/$name.json") ;; esac
done

echo "== all stages in $(( $(date +%s) - T_START ))s; logs and JSON in $OUT"
# One table of every stage's runs against main's (a) (the later stages' numerics are checked against main's (b)
# too), and the fastest run whose numerics held: $OUT/summary.txt.
"$PYTHON" scripts/bench_summary.py "${jsons[@]}" | tee "$OUT/summary.txt"
cat "$OUT/stages.txt"
! grep -qv ': ok ' "$OUT/stages.txt"
