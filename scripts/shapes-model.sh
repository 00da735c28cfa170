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

train=(
  --dataset_base_path "$ROOT/data" --dataset_metadata_path "$ROOT/data/metadata.csv"
  --model_paths "[\"$ROOT/dit-init.safetensors\", \"$ROOT/ae.safetensors\", \"$ROOT/text_encoder/model.safetensors\"]"
  --tokenizer_path "$ROOT/tokenizer" --height 128 --width 128
  --pipeline_args '{"max_sequence_length": 32}' --caption_dropout 0.1
  --trainable_models dit --output_path "$ROOT/train"
)
$BIN/diffstudio train "${train[@]}" --task sft:data_process
stamp "split training, stage 1 (latents and prompt embeddings cached)"
$BIN/diffstudio train "${train[@]}" --task sft:train --resume \
  --learning_rate 4e-4 --lr_scheduler cosine --lr_warmup_steps 200 \
  --weight_decay 0 --batch_size 32 --num_epochs 1000 --max_steps 8000 --mixed_precision bf16 \
  --timestep_sampling uniform --loss_weighting none --ema_decay 0.999 \
  --checkpoint_steps 500 --save_steps 1000
stamp "dit"
$BIN/diffstudio shapes-build install "$ROOT" --dit "$ROOT/train/step-8000.safetensors"
$BIN/diffstudio eval-shapes --count 200 --seed 1
stamp "installed and evaluated"
