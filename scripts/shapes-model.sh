#!/usr/bin/env bash
# Rebuild the embedded diffstudio/shapes model from nothing, then install it into the package and evaluate it.
# Every stage skips work whose output exists, so an interrupted run continues where it stopped
# (training resumes from its last checkpoint). Usage: bash scripts/shapes-model.sh [BUILD_FOLDER]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="${1:-build/shapes}"
BIN=.venv/bin
THREADS="${SHAPES_THREADS:-2}"
export OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"
mkdir -p "$ROOT"
start=$(date +%s)
stamp() { echo "[shapes-model] $1 after $(( $(date +%s) - start )) s"; }

$BIN/diffstudio shapes-data "$ROOT/data" --count 8000 --size 128 --seed 0
stamp "data"
$BIN/diffstudio shapes-build text "$ROOT"
stamp "text encoder and tokenizer"
$BIN/diffstudio shapes-build vae "$ROOT"
stamp "vae"
$BIN/diffstudio shapes-build dit-init "$ROOT"

# DiT inputs (models), shared arguments, and the two stages' arguments: stage 2 reads stage 1's cached rows.
models() { echo "[\"$1\", \"$ROOT/ae.safetensors\", \"$ROOT/text_encoder/model.safetensors\"]"; }
common=(
  --dataset_base_path "$ROOT/data" --dataset_metadata_path "$ROOT/data/metadata.csv"
  --tokenizer_path "$ROOT/tokenizer" --height 128 --width 128
  --pipeline_args '{"max_sequence_length": 32}' --caption_dropout 0.1 --trainable_models dit
  --weight_decay 0 --batch_size 32 --num_epochs 1000
  --timestep_sampling uniform --loss_weighting none --ema_decay 0.999 --checkpoint_steps 500 --save_steps 1000
)
train=("${common[@]}" --model_paths "$(models "$ROOT/dit-init.safetensors")" --output_path "$ROOT/train")
finetune=("${common[@]}" --model_paths "$(models "$ROOT/finetune-init.safetensors")" --output_path "$ROOT/finetune")
$BIN/diffstudio train "${train[@]}" --task sft:data_process
stamp "split training, stage 1 (latents and prompt embeddings cached)"
$BIN/diffstudio train "${train[@]}" --task sft:train --resume --max_steps 8000 \
  --learning_rate 4e-4 --lr_scheduler cosine --lr_warmup_steps 200 --mixed_precision bf16
stamp "dit"
# Stage 2 of the DiT: 4000 more steps from step 8000 on the same cached rows (hard links), a new cosine at 1e-4.
# Shape class on the 200 held-out captions: 0.875 after stage 1, 0.915 after stage 2.
mkdir -p "$ROOT/finetune"
[ -d "$ROOT/finetune/cache" ] || cp -al "$ROOT/train/cache" "$ROOT/finetune/cache"
cp -n "$ROOT/train/step-8000.safetensors" "$ROOT/finetune-init.safetensors"
$BIN/diffstudio train "${finetune[@]}" --task sft:train --resume --max_steps 4000 \
  --learning_rate 1e-4 --lr_scheduler cosine --lr_warmup_steps 100 --mixed_precision no
stamp "dit, stage 2"
$BIN/diffstudio shapes-build install "$ROOT" --dit "$ROOT/finetune/step-4000.safetensors"
$BIN/diffstudio eval-shapes --count 200 --seed 1 --variety 50
stamp "installed and evaluated"
