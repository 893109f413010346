#!/usr/bin/env sh
# The one-GPU example: train its parent on the GPU (a 77M-parameter Llama, ~1-2 minutes on an H100/H200),
# write its distillation text, then run the whole pipeline on that GPU. Usage, from the repository root:
#
#   sh examples/gpu/run.sh            # parent + data (skipped when present) + `puzzle run`
#
# Sizes are ones stock engines serve: head_dim 64 (12 heads of 64 in hidden 768) and FFN widths on vLLM's
# grid (round_up(int(2 * ffn_mult * 768 / 3), 256): 512, 1024, 1536 and the parent's 2048).
set -eu
here=$(dirname "$0")
start=$(date +%s)
if [ ! -f "$here/parent/model.safetensors" ]; then
  puzzle parent train-tiny --out "$here/parent" --device cuda --no-progress \
    --hidden-size 768 --num-hidden-layers 12 --num-attention-heads 12 --num-key-value-heads 4 \
    --intermediate-size 2048 --vocab-size 1024 --max-position-embeddings 2048 \
    --seq-len 512 --batch-size 32 --steps 800 --lr 1e-3 --warmup-steps 40 --threads 8 > "$here/parent.log"
fi
echo "parent ready in $(( $(date +%s) - start )) s" >&2
if [ ! -f "$here/data/train.txt" ]; then
  puzzle parent corpus --out "$here/data" --train-chars 12000000 --valid-chars 1000000
fi
echo "parent and data ready in $(( $(date +%s) - start )) s" >&2
puzzle run "$here/puzzle.yaml" --workers 3 "$@"
echo "whole example in $(( $(date +%s) - start )) s" >&2
