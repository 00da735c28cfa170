#!/usr/bin/env bash
# Teach the embedded shapes model a new concept with a LoRA ("a zigzag", absent from its training data) and
# print the analyser's zigzag hit rate without and with it. Usage: bash scripts/shapes-zigzag-lora.sh [FOLDER]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="${1:-build/zigzag}"
BIN=.venv/bin
W=plugins/shapes/src/diffstudio_shapes/weights
export OMP_NUM_THREADS="${SHAPES_THREADS:-2}"
$BIN/diffstudio shapes-data "$ROOT/data" --count 600 --size 128 --seed 7 --shapes zigzag
args=(
  --dataset_base_path "$ROOT/data" --dataset_metadata_path "$ROOT/data/metadata.csv"
  --model_paths "[\"$W/flux2-shapes.safetensors\", \"$W/ae.safetensors\", \"$W/text_encoder/model.safetensors\"]"
  --tokenizer_path "$W/tokenizer" --height 128 --width 128 --pipeline_args '{"max_sequence_length": 32}'
  --caption_dropout 0.1 --lora_base_model dit --lora_target_modules "qkv,proj,linear1,linear2,img_mlp.0,img_mlp.2"
  --lora_rank 16 --output_path "$ROOT/lora"
)
$BIN/diffstudio train "${args[@]}" --task sft:data_process
$BIN/diffstudio train "${args[@]}" --task sft:train --resume --learning_rate 1e-3 --weight_decay 0 \
  --batch_size 16 --num_epochs 100 --max_steps 1000 --timestep_sampling logit_normal --loss_weighting none \
  --checkpoint_steps 100
echo "without the LoRA:"
$BIN/diffstudio eval-shapes --count 100 --seed 3 --shapes zigzag --split train
echo "with the LoRA:"
$BIN/diffstudio eval-shapes --count 100 --seed 3 --shapes zigzag --split train --lora "$ROOT/lora/step-1000.safetensors"
