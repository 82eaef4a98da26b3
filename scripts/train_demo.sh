#!/usr/bin/env bash
# Reproduce the bundled demo model (mlx_llava/demo) from scratch, on CPU or Apple silicon.
#
#   bash scripts/train_demo.sh [WORK_DIR]
#
# Shapes-world pictures and conversations in many wordings -> an untrained model (tokenizer
# learned on the shapes text, random weights) -> the vision tower pre-trained on shapes-world
# labels (standing in for CLIP) -> stage 1 (projector on captions) -> stage 2 (projector +
# language model, the tower frozen, as LLaVA does) -> mlx_llava/demo -> its accuracy on a test
# set, in the original wordings, in wordings held out from training and in three-turn chats.
# About an hour on 2 idle CPU cores; timings in docs/training.md.
# On Linux CPUs, preloading OpenBLAS (LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0)
# makes MLX's matmuls several times faster.
set -euo pipefail
WORK=${1:-runs/demo}
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$WORK"
cd "$WORK"

# 1. Data: 12000 training pictures (2 % held out for the validation loss), where a third of the
#    later shapes repeat an earlier one (captions like "Two blue squares."), each with a
#    conversation in the training wordings; and a test set drawn with another seed and other
#    picture sizes, with its questions in the original and in the held-out wordings.
python -m mlx_llava.data.shapes --out shapes_train --n 12000 --seed 0 \
    --min-size 48 --max-size 160 --val-fraction 0.02 --repeat-share 0.3
python -m mlx_llava.data.shapes --out shapes_test --n 400 --seed 12345 \
    --min-size 40 --max-size 224

# 2. The stage-2 data mix (shapes_train/mix.json) and the untrained model.
python "$REPO/scripts/prepare_demo.py" --data shapes_train --out init

# 3. The vision tower learns to see shapes (the demo's stand-in for CLIP's pre-training):
#    shapes-world labels from its patch features, on pictures drawn on the fly.
python -m mlx_llava.train.shapes_tower --model init --output tower \
    --iters 4000 --batch-size 64 --learning-rate 1e-3

# 4. Stage 1: feature alignment (projector only, plain template, captions).
python "$REPO/train.py" --model tower --stage pretrain \
    --data shapes_train/pretrain.json --val-data shapes_train/pretrain_val.json \
    --output stage1 --epochs 1 --batch-size 32 --learning-rate 1e-3 \
    --log-every 10 --val-every 100 --no-compile

# 5. Stage 2: instruction tuning (vicuna_v1), the vision tower frozen as in LLaVA.
python "$REPO/train.py" --model stage1 --stage finetune \
    --data shapes_train/mix.json --val-data shapes_train/mix_val.json \
    --output stage2 --epochs 1 --batch-size 16 --learning-rate 1e-3 \
    --log-every 20 --val-every 250 --save-every 250 --no-compile

# 6. The bundled copy: the model files only (no checkpoint, no log).
DEMO="$REPO/mlx_llava/demo"
rm -rf "$DEMO" && mkdir -p "$DEMO"
cp stage2/config.json stage2/model.safetensors stage2/model.safetensors.index.json \
    stage2/tokenizer.json stage2/tokenizer_config.json stage2/special_tokens_map.json \
    stage2/preprocessor_config.json "$DEMO/"

# 7. Its accuracy on the test set: the original questions (with LLaVA-1.5's single-word
#    instruction, as before), questions in held-out wordings as a person types them, three-turn
#    chats in held-out wordings (the model's own answers in the history), and descriptions.
for questions in qa.json qa_heldout.json chat_heldout.json captions_heldout.json; do
    suffix=--no-single-word-suffix
    [ "$questions" = qa.json ] && suffix=--single-word-suffix
    echo "== shapes_test/$questions ($suffix)"
    python "$REPO/evaluate.py" --model "$DEMO" --data "shapes_test/$questions" "$suffix" \
        --max-tokens 32 --output "eval/${questions%.json}.jsonl"
done
