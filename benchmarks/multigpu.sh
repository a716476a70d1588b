#!/usr/bin/env bash
# Issue 17's runs on a machine with two GPUs that has torch and transformers but none of the
# pipeline's other packages and no network (docs/training.md, "Two GPUs (issue 17)", lists the
# device calls). Every run is the pipeline's own command with the arguments its
# rule passes (options from benchmarks/multigpu.py and config/benchmarks/multigpu.yaml), once on
# one GPU and once on two:
#
#   benchmarks/multigpu.sh park               # each call that carries a wheel part: keep it in $EGM_PARTS
#   benchmarks/multigpu.sh check              # the GPUs and the image's versions the wheels rely on
#   benchmarks/multigpu.sh install            # check and unpack both wheel sets, install into $EGM_SITE
#   benchmarks/multigpu.sh prepare            # data sets and models, with the pipeline's commands
#   benchmarks/multigpu.sh sft                # SFT, 1 GPU, then 2 (torchrun + DeepSpeed ZeRO-3)
#   benchmarks/multigpu.sh grpo [hf|vllm|vllm-server]  # GRPO: transformers, colocated vLLM or a vLLM server
#   benchmarks/multigpu.sh predict ENGINE [MODEL...]   # hf or vllm; one replica per GPU on two
#   benchmarks/multigpu.sh ray [pp|tp]        # two Ray nodes on this host, one vLLM engine across them
#   benchmarks/multigpu.sh rollouts [ARGS]    # issue 32, one GPU: benchmarks/grpo_rollouts.py run ARGS
#   benchmarks/multigpu.sh record             # the record so far (every run subcommand ends with it)
#   benchmarks/multigpu.sh restore ARCHIVE    # an earlier call's multigpu-logs.tar.gz: its finished runs count
#   benchmarks/multigpu.sh redo STEP...       # run these predict/ray steps again (their outputs go)
#
# The record goes to $OUT/multigpu-h200x2.json where OUT is set (else results/multigpu/), with the
# logs packed beside it. A step that finished (status/<step>.json, exit 0) is not run again, so a
# subcommand cut short is simply called again. Each subcommand ends on its own within
# EGM_CALL_S seconds (default 540: a device call may run 600), each step time-boxed inside that.
# EGM_DRY_RUN=1 prints every command instead of running it.
#
# Environment (defaults in brackets): EGM_MGPU_CONFIG [config/benchmarks/multigpu.yaml],
# EGM_MGPU_WORK, the runs' work directory [/tmp/egm-mgpu], EGM_SITE [/tmp/egm-mgpu-site], EGM_PARTS
# [/tmp/egm-parts], EGM_SMOKE_MIRROR, where the demo's trained model is [resources/gpu_smoke_mirror].
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
site=${EGM_SITE:-/tmp/egm-mgpu-site}
parts=${EGM_PARTS:-/tmp/egm-parts}
work=${EGM_MGPU_WORK:-/tmp/egm-mgpu}
out=${OUT:-$repo/results/multigpu}
smoke_mirror=${EGM_SMOKE_MIRROR:-$repo/resources/gpu_smoke_mirror}
dry=${EGM_DRY_RUN:-}
started=$(date +%s)
deadline=$((started + ${EGM_CALL_S:-540}))
cmd=${1:?usage: multigpu.sh park|check|install|prepare|sft|grpo|predict|ray|rollouts|record ...}
shift

config=${EGM_MGPU_CONFIG:-$repo/config/benchmarks/multigpu.yaml}
# The benchmark scripts are modules of the repository (python -m benchmarks.<name>), from any folder.
mg() { PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" python3 -m benchmarks.multigpu --config "$config" "$@"; }
say() { echo "== $(date +%T) $*"; }

# run_step NAME SECONDS DIR LOG command...: in DIR, output to LOG, exit code and wall time to
# status/NAME.json; skipped once it has succeeded; cut to the time left before the deadline
# (less 45 s for the record). SIGINT first: a Python job then ends through its finally blocks.
run_step() {
  local name=$1 limit=$2 dir=$3 log=$4
  shift 4
  if [ -n "$dry" ]; then
    printf '(cd %q && ' "$dir"; printf '%q ' "$@"; printf '>%q 2>&1)\n' "$log"
    return 0
  fi
  local status="$work/status/$name.json"
  if [ -f "$status" ] && grep -q '"rc": 0,' "$status"; then
    say "$name: done before, skipped"
    return 0
  fi
  local left=$((deadline - $(date +%s) - 45))
  if [ "$left" -lt 30 ]; then
    say "$name: not started, ${left} s left in this call"
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  mkdir -p "$work/status" "$dir/$(dirname "$log")"
  say "$name (at most $limit s): $*"
  local t0 rc
  t0=$(date +%s%N)
  (cd "$dir" && timeout -s INT -k 30 "$limit" "$@" >"$log" 2>&1)
  rc=$?
  printf '{"rc": %d, "wall_s": %s, "limit_s": %d}\n' "$rc" \
    "$(( ($(date +%s%N) - t0) / 1000000 ))e-3" "$limit" >"$status"
  say "$name: exit $rc"
  [ "$rc" -eq 0 ] || tail -n 15 "$dir/$log"
  return "$rc"
}

gpus_of() { [ "$1" -eq 1 ] && echo 0 || echo 0,1; }

if [ "$cmd" = park ]; then
  # The carried part, outside the tree: the next call's tree may not hold it.
  for p in .vllm/part-* .mgpu/part-* .mgpu/SHA256SUMS; do
    [ -f "$repo/$p" ] || continue
    mkdir -p "$parts/$(dirname "$p")" && cp "$repo/$p" "$parts/$p" && echo "parked $p"
  done
  ls -l "$parts"/.vllm "$parts"/.mgpu 2>/dev/null
  exit 0
fi

if [ "$cmd" = restore ]; then
  # The runs an earlier machine finished, from the archive `record` wrote there: their statuses,
  # manifests, logs and predictions, so the record holds them and they are not run again. Not its
  # environment (this machine writes its own; each run names its code) and not the prepared data
  # and models, which the archive does not hold: those steps run again here.
  archive=${1:?restore ARCHIVE}
  mkdir -p "$work" && tar -xzf "$archive" -C "$work" --exclude=environment.json --exclude='status/prep-*' || exit 1
  ls "$work/status"
  exit 0
fi

if [ "$cmd" = redo ]; then
  # Predictions resume from their work cache, so a step run again must lose its outputs too.
  for step in "$@"; do
    case "$step" in
      predict-*) key=${step#predict-} ;;
      ray-*) key=$(mg get ray.model)-vllm-$step ;;
      *) echo "redo: only predict-* and ray-* steps, not $step" >&2; exit 2 ;;
    esac
    rm -rf "$work/predict/results/predictions/$key" "$work/predict/logs/predict/$key.log" "$work/status/$step.json"
    echo "redo $step: status and results/predictions/$key removed"
  done
  exit 0
fi

if [ "$cmd" = check ]; then
  # What the wheel sets take from the image: datasets needs pyarrow >= 24 and fsspec <= 2026.9.0.
  python3 -c "import torch; print('GPUs:', torch.cuda.device_count(), torch.__version__)"
  python3 -m pip list 2>/dev/null | grep -i -E '^(pyarrow|fsspec|pandas|packaging|yarl|transformers|accelerate|huggingface.hub) '
  exit 0
fi

if [ "$cmd" = install ]; then
  [ -f "$site/.installed" ] && { echo "installed before in $site"; exit 0; }
  (cd "$parts" && sha256sum -c --quiet .mgpu/SHA256SUMS) || { echo "wheel parts missing or damaged in $parts"; exit 1; }
  whl=$(mktemp -d)
  cat "$parts"/.vllm/part-* | tar -x -C "$whl" && cat "$parts"/.mgpu/part-* | tar -x -C "$whl" || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$whl"/*.whl || exit 1
  rm -rf "$whl"
  touch "$site/.installed"
  exit 0
fi

# Rules call `python -m egm`; console scripts (ray, torchrun) live in the site's bin. A wrapper,
# not a symlink: a venv's python reached through a symlink elsewhere loses the venv. Written
# beside and moved into place: writing to a path that is a symlink would overwrite its target.
if [ -z "$dry" ]; then
  mkdir -p "$work/bin" && wrapper=$(mktemp "$work/bin/.python.XXXXXX") &&
    printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" >"$wrapper" && chmod +x "$wrapper" &&
    mv -f "$wrapper" "$work/bin/python" || exit 1
  export PATH="$site/bin:$work/bin:$PATH" PYTHONPATH="$site:$repo" PYTHONUNBUFFERED=1
fi
# Multicast stays off on shared hosts (KINDS.md); vLLM without flashinfer; no hub, no telemetry.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 VLLM_USE_FLASHINFER_SAMPLER=0 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0

if [ "$cmd" = rollouts ]; then
  # Issue 32 on one GPU (benchmarks/grpo_rollouts.py): GRPO with vLLM colocate against generate
  # rollouts and the weight-sync check, in the time left of this call; the record goes to $OUT.
  left=$((deadline - $(date +%s) - 20))
  set -- python3 -m benchmarks.grpo_rollouts run --out "$out" --budget-s "$left" "$@"
  [ -n "$dry" ] && { printf '%q ' "$@"; echo; exit 0; }
  "$@"
  exit $?
fi

train=$work/train
pred=$work/predict
split=$(mg get predict.split) || exit 1
split_file=resources/hub/egm-mgpu/eval-data/metadata/eval/$split.jsonl

record() {
  [ -n "$dry" ] && return 0
  mkdir -p "$out"
  local mgpy=(-m benchmarks.multigpu --config "$config")
  [ -f "$work/environment.json" ] || timeout 120 python3 "${mgpy[@]}" environment --out "$work/environment.json"
  timeout 120 python3 "${mgpy[@]}" record --work "$work" --out "$out/multigpu-h200x2.json"
  # Logs, step statuses, training manifests and the predictions the agreement is computed from.
  (cd "$work" && timeout 60 tar -czf "$out/multigpu-logs.tar.gz" status environment.json train/logs predict/logs \
    train/results/checkpoints/*/*.json train/results/checkpoints/*/*/training.json predict/results/predictions \
    2>/dev/null)
  ls -l "$out"
}

mirror=$work/mirror

prepare_train() {
  local m=$mirror
  [ -n "$dry" ] || mkdir -p "$train" "$m"
  # Training data at 640x480 and the 2B architecture with random weights, drawn on the GPU.
  local width height images
  width=$(mg get train.data.width) height=$(mg get train.data.height) images=$(mg get train.data.train_images)
  run_step prep-train-data 300 "$train" logs/prepare/data.log sh -c "
    python -m egm make-demo --mirror $m --dataset-repo egm-mgpu/train-data --model-repo egm-mgpu/unused-tiny \
      --train-images $images --eval-per-split 2 --width $width --height $height --summary $m/train-data.json &&
    python -m egm fetch --repo-type dataset --repo-id egm-mgpu/train-data --mirror $m \
      --dest resources/hub/egm-mgpu/train-data --manifest resources/manifests/dataset.json &&
    for a in coco coco_flip; do python -m egm extract --archive \$a --dataset-dir resources/hub/egm-mgpu/train-data \
      --fetch-manifest resources/manifests/dataset.json --dest resources/images \
      --manifest resources/manifests/images-\$a.json || exit 1; done &&
    for p in train val; do python -m egm rewrite-parquet \
      resources/hub/egm-mgpu/train-data/processed_rl_data/\${p}_grounding.parquet resources/rl/\$p.parquet \
      --image-root resources/images || exit 1; done" || return 1
  local base
  base=$(mg get train.base)
  run_step prep-train-model 300 "$train" logs/prepare/model.log sh -c "
    python -m egm write-architecture --arch $base --weights --device $(mg get train.weights_on) \
      --out $m/egm-mgpu/$base-random &&
    python -m egm fetch --repo-type model --repo-id egm-mgpu/$base-random --mirror $m \
      --dest resources/models/$base --manifest resources/manifests/model-$base.json" || return 1
}

prepare_predict() {
  local m=$mirror
  [ -n "$dry" ] || mkdir -p "$pred" "$m"
  # One eval split of `records` records at the demo's 96x96, the demo's trained model, the 8B
  # architecture without weights.
  local records
  records=$(mg get predict.records)
  run_step prep-predict 300 "$pred" logs/prepare/predict.log sh -c "
    python -m egm make-demo --mirror $m --dataset-repo egm-mgpu/eval-data --model-repo egm-mgpu/unused-tiny \
      --train-images 1 --eval-per-split $records --summary $m/eval-data.json &&
    python -m egm fetch --repo-type dataset --repo-id egm-mgpu/eval-data --mirror $m \
      --dest resources/hub/egm-mgpu/eval-data --manifest resources/manifests/dataset.json &&
    python -m egm extract --archive coco --dataset-dir resources/hub/egm-mgpu/eval-data \
      --fetch-manifest resources/manifests/dataset.json --dest resources/images --manifest resources/manifests/images-coco.json &&
    python -m egm fetch --repo-type model --repo-id $(mg get predict.models.tiny-sft.repo_id) --mirror $smoke_mirror \
      --dest resources/models/tiny-sft --manifest resources/manifests/model-tiny-sft.json &&
    python -m egm write-architecture --arch $(mg get predict.models.qwen3-vl-8b.architecture) \
      --out $m/egm-mgpu/qwen3-vl-8b-architecture &&
    python -m egm fetch --repo-type model --repo-id egm-mgpu/qwen3-vl-8b-architecture --mirror $m \
      --dest resources/models/qwen3-vl-8b --manifest resources/manifests/model-qwen3-vl-8b.json" || return 1
}

# The sft rule's command (workflow/rules/train.smk) for run gpusN.
sft_step() {
  local gpus=$1 run=gpus$1 base
  base=$(mg get train.base)
  run_step "sft-$run" 330 "$train" "logs/train/$run/sft.log" env CUDA_VISIBLE_DEVICES="$(gpus_of "$gpus")" \
    python -m egm sft --model-dir "resources/models/$base" --model-manifest "resources/manifests/model-$base.json" \
    --data resources/hub/egm-mgpu/train-data/vanilla_grounding_reasoning_training_dataset_raw.jsonl \
    --image-root resources/images --inputs resources/manifests/dataset.json --out-dir "results/checkpoints/$run/sft" \
    --manifest "results/checkpoints/$run/sft.json" --work-dir "results/checkpoints/$run/.work/sft" \
    --options "$(mg options sft "$run")" --gpus "$gpus"
}

# The rl rule's command, every run starting from the one-GPU SFT result (the same weights).
rl_step() {
  local gpus=$1 rollout=$2 run=gpus$1
  [ "$rollout" = hf ] || run="$run-$rollout"  # as multigpu.py's train_run names it
  run_step "rl-$run" 400 "$train" "logs/train/$run/rl.log" env CUDA_VISIBLE_DEVICES="$(gpus_of "$gpus")" \
    python -m egm rl --model-dir results/checkpoints/gpus1/sft --model-manifest results/checkpoints/gpus1/sft.json \
    --train resources/rl/train.parquet --val resources/rl/val.parquet --out-dir "results/checkpoints/$run/rl" \
    --manifest "results/checkpoints/$run/rl.json" --work-dir "results/checkpoints/$run/.work/rl" \
    --options "$(mg options rl "$run" "$rollout")" --gpus "$gpus"
}

# The predict rule's command (workflow/rules/infer.smk) for one model, engine and GPU count.
predict_step() {
  local engine=$1 model=$2 gpus=$3 key="$2-$1-$3gpu" options
  options=$(mg options predict "$model" "$engine" --gpus "$gpus")
  run_step "predict-$key" 420 "$pred" "logs/predict/$key.log" env CUDA_VISIBLE_DEVICES="$(gpus_of "$gpus")" \
    python -m egm predict --model-dir "resources/models/$model" \
    --model-manifest "resources/manifests/model-$model.json" --splits "$split_file" --image-root resources/images \
    --out-dir "results/predictions/$key" --options "$options" --model "$key" \
    --data-manifest resources/manifests/dataset.json --run-record "results/predictions/$key/run.json"
}

status=0
case "$cmd" in
  # Every run prepares what it needs first: done steps are skipped, so this costs nothing twice.
  prepare)
    prepare_train || status=$?
    prepare_predict || status=$?
    ;;
  sft)
    prepare_train || status=$?
    for g in 1 2; do sft_step "$g" || status=$?; done
    ;;
  grpo)
    rollout=${1:-hf}
    prepare_train || status=$?
    # GRPO starts from the one-GPU SFT result; a restored run has its record but not its weights.
    [ -n "$dry" ] || [ -f "$train/results/checkpoints/gpus1/sft/config.json" ] || rm -f "$work/status/sft-gpus1.json"
    sft_step 1 || status=$?
    # Server mode needs a GPU for the server beside one for training: on two GPUs only.
    counts="1 2"; [ "$rollout" = vllm-server ] && counts="2" && { rl_step 1 vllm || status=$?; }
    for g in $counts; do rl_step "$g" "$rollout" || status=$?; done
    ;;
  predict)
    engine=${1:?predict hf|vllm [MODEL...]}
    shift
    models=("$@")
    [ ${#models[@]} -gt 0 ] || models=(tiny-sft)
    prepare_predict || status=$?
    for model in "${models[@]}"; do
      for g in 1 2; do predict_step "$engine" "$model" "$g" || status=$?; done
    done
    ;;
  ray)
    variant=${1:-pp}
    prepare_predict || status=$?
    model=$(mg get ray.model)
    nodes=$(mg get ray.nodes)
    per_node=$(mg get ray.gpus_per_node)
    # The one-GPU answers to compare with: the predict vllm run's, or made here if it has not run.
    predict_step vllm "$model" 1 || status=$?
    key="$model-vllm-ray-$variant"
    run_step "ray-$variant" 480 "$pred" "logs/predict/$key.log" env CUDA_VISIBLE_DEVICES=0,1 \
      python -m egm.infer.backends.ray_slurm --local-nodes "$nodes" --gpus-per-node "$per_node" --timeout-s 120 -- \
      python -m egm predict --model-dir "resources/models/$model" \
      --model-manifest "resources/manifests/model-$model.json" --splits "$split_file" --image-root resources/images \
      --out-dir "results/predictions/$key" --options "$(mg options ray "$variant")" --model "$key" \
      --data-manifest resources/manifests/dataset.json --run-record "results/predictions/$key/run.json" || status=$?
    ;;
  record) ;;
  *)
    echo "unknown subcommand $cmd" >&2
    exit 2
    ;;
esac
record
exit "$status"
