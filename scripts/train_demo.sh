#!/usr/bin/env bash
# Reproduce the bundled demo model (mlx_llava/demo) from scratch, on CPU or Apple silicon.
#
#   bash scripts/train_demo.sh [WORK_DIR]
#
# Shapes-world pictures -> an untrained model (tokenizer learned on the shapes text, random
# weights) -> stage 1 (projector on captions) -> stage 2 (projector + language model, the
# random vision tower frozen, as LLaVA does) -> mlx_llava/demo. Timings are in docs/training.md. On Linux CPUs, preloading OpenBLAS
# (LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0) makes MLX's matmuls several times
# faster.
set -euo pipefail
WORK=${1:-runs/demo}
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$WORK"
cd "$WORK"

# 1. Data: 6000 training pictures (2 % held out for the validation loss) and a test set drawn
#    with another seed and other picture sizes.
python -m mlx_llava.data.shapes --out shapes_train --n 6000 --seed 0 \
    --min-size 48 --max-size 160 --val-fraction 0.02
python -m mlx_llava.data.shapes --out shapes_test --n 400 --seed 12345 \
    --min-size 40 --max-size 224

# 2. The stage-2 data mix (shapes_train/mix.json) and the untrained model.
python "$REPO/scripts/prepare_demo.py" --data shapes_train --out init

# 3. Stage 1: feature alignment (projector only, plain template, captions).
python "$REPO/train.py" --model init --stage pretrain \
    --data shapes_train/pretrain.json --val-data shapes_train/pretrain_val.json \
    --output stage1 --epochs 1 --batch-size 32 --learning-rate 1e-3 \
    --log-every 10 --val-every 100 --no-compile

# 4. Stage 2a: instruction tuning (vicuna_v1), vision tower frozen (a tower trained before the
#    language model looks at the pictures learns to make them all alike).
python "$REPO/train.py" --model stage1 --stage finetune \
    --data shapes_train/mix.json --val-data shapes_train/mix_val.json \
    --output stage2a --epochs 2 --batch-size 16 --learning-rate 1e-3 \
    --log-every 20 --val-every 250 --save-every 250 --no-compile

# 5. The bundled copy: the model files only (no checkpoint, no log).
DEMO="$REPO/mlx_llava/demo"
rm -rf "$DEMO" && mkdir -p "$DEMO"
cp stage2a/config.json stage2a/model.safetensors stage2a/model.safetensors.index.json \
    stage2a/tokenizer.json stage2a/tokenizer_config.json stage2a/special_tokens_map.json \
    stage2a/preprocessor_config.json "$DEMO/"
