#!/usr/bin/env bash
# Issue 30's measurements of the fast decode, in one device call on a GPU machine that has torch
# and transformers (vLLM from $EGM_SITE, installed by `benchmarks/multigpu.sh install`):
#
#   benchmarks/fast_decode_gpu.sh kernels     # decode_kernels.py: products and attention, batch 1/8/64,
#                                             # the attention's launch configurations swept at batch 64
#   benchmarks/fast_decode_gpu.sh sweep       # the same with the products' launch configurations swept
#   benchmarks/fast_decode_gpu.sh batched     # decode_kernels.py: the products at batch 64, cuBLAS and max-autotune
#   benchmarks/fast_decode_gpu.sh equality    # decode_equality.py on the demo's trained tiny model, batch 1, 8, 64
#   benchmarks/fast_decode_gpu.sh latency     # latency.py, 8B: graph_compiled, vLLM, both engine paths
#                                             # (EGM_LATENCY_METHODS=graph_compiled,engine_egm: egm's alone)
#
# Several subcommands run in order (`kernels latency`). Records go to $OUT (else results/fast-decode/)
# named by the card (h100, h200); each step is time-boxed inside EGM_CALL_S seconds (default 580: a
# device call may run 600), so the call ends on its own, with its log beside the records.
# EGM_SMOKE_MIRROR: where the demo's trained model and eval data are.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
site=${EGM_SITE:-/tmp/egm-mgpu-site}
out=${OUT:-$repo/results/fast-decode}
mirror=${EGM_SMOKE_MIRROR:-$repo/resources/gpu_smoke_mirror}/egm-demo
deadline=$(($(date +%s) + ${EGM_CALL_S:-580}))
mkdir -p "$out"
export PATH="$site/bin:$PATH" PYTHONPATH="$site:$repo" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 VLLM_USE_FLASHINFER_SAMPLER=0 TOKENIZERS_PARALLELISM=false
card=$(python3 -c "import torch; n = torch.cuda.get_device_name(0); print('h200' if 'H200' in n else 'h100' if 'H100' in n else 'gpu')")
say() { echo "== $(date +%T) $*" | tee -a "$out/fast-decode-$card.log"; }
# step SECONDS command...: time-boxed (SIGINT first, so Python writes what it has) to SECONDS or
# what is left before the deadline, logged.
step() {
  local limit=$1 left=$((deadline - $(date +%s) - 10))
  shift
  [ "$left" -lt "$limit" ] && limit=$left
  [ "$limit" -lt 30 ] && { say "skipped, ${limit}s left: $*"; return; }
  say "$* (limit ${limit}s)"
  timeout -s INT -k 20 "$limit" "$@" >>"$out/fast-decode-$card.log" 2>&1
  say "exit $?"
}

for cmd in "$@"; do
  case $cmd in
    kernels)
      step 300 python3 -m benchmarks.decode_kernels --no-sweep --attention-sweep --reps 7 \
        --out "$out/decode-kernels-$card.json" ;;
    sweep)
      # The same with each product's launch configurations swept as the decoder calls it (what
      # GEMV_CONFIG is chosen from); the record is written at the end, so the step has room.
      step 400 python3 -m benchmarks.decode_kernels --reps 7 --out "$out/decode-kernels-sweep-$card.json" ;;
    batched)
      # max-autotune benchmarks its candidates per shape while compiling: minutes, in a call of its own.
      step 450 python3 -m benchmarks.decode_kernels --parts batched --product-batches 64 --reps 7 \
        --out "$out/decode-kernels-batched-$card.json" ;;
    equality)
      images=/tmp/egm-equality-images
      if [ ! -d "$images/coco" ]; then
        mkdir -p "$images" && cat "$mirror"/EGM_Datasets/coco.tar.part_* | tar -x -C "$images" --no-same-owner
      fi
      # Batch 1 answers 16 records per split (generate one at a time is the slow side), 8 and 64 all;
      # float32 and bfloat16, the latter beside its own yardstick (bf16 generate against float32's).
      for batch in 1 8 64; do
        limit=(); [ "$batch" = 1 ] && limit=(--limit 16)
        step 170 python3 -m benchmarks.decode_equality --model-dir "$mirror/tiny-qwen3-vl-sft" \
          --splits "$mirror"/EGM_Datasets/metadata/eval/*.jsonl --image-root "$images" --batch-size "$batch" \
          "${limit[@]}" --own-spread --out "$out/decode-equality-$card-b$batch.json"
      done ;;
    latency)
      # latency.py starts nothing after --budget-s: 40 s before the deadline for what is running to end.
      left=$((deadline - $(date +%s) - 50))
      # The decode step's kernel table at each batch (the record keeps its totals).
      # EGM_LATENCY_METHODS: other methods than the four (egm's alone need no vLLM wheels); their
      # record is named by them, beside latency-$card.json, not over it.
      methods=${EGM_LATENCY_METHODS:-graph_compiled,vllm,engine_egm,engine_vllm}
      name=latency-$card; [ -n "${EGM_LATENCY_METHODS:-}" ] && name=latency-$card-${methods//,/-}
      mkdir -p "$out/profiles-$card"
      step 560 python3 -m benchmarks.latency --models qwen3-vl-8b --methods "$methods" \
        --budget-s "$((left > 60 ? left - 40 : 20))" --profile-dir "$out/profiles-$card" --out "$out/$name.json" ;;
    *) echo "unknown step $cmd" >&2; exit 2 ;;
  esac
done
