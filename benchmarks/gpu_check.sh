#!/usr/bin/env bash
# One prepared GPU check: decode / TTFT of a 7B-shaped LLaVA (CLIP ViT-L/14-336 + Llama 32x4096)
# in float16 and 4-bit on one NVIDIA H100, against the memory-bandwidth bound.
#
#   bash benchmarks/gpu_check.sh            # from the repository root; results in $OUT/gpu.json
#
# Assumes the packages are installed already (no network): mlx[cuda12] (or cuda13), mlx-lm,
# transformers, tokenizers, numpy, pillow, safetensors (and this package, or it is found from
# the checkout).
# Needs ~32 GB of free disk under $WORK and should take ~4-5 minutes: every step has a time limit,
# the whole script a budget of $BUDGET s (345), and gpu.json is written whatever happens, with
# the steps that finished.
#
# Steps: random llava-hf checkpoint in float16 (make_checkpoint.py --preset 7b, streamed shard by
# shard) -> MLX float16 and MLX 4-bit (group 64) -> bench.py single-stream + bandwidth sections on
# each (2 runs, 128 tokens; float16 also prefix reuse, chat and a batch of 8, once) -> gpu.json
# with tokens/s, TTFT and the bound 3.35 TB/s / bytes per token (H100 SXM's HBM3 peak) beside
# the bound measured with a plain matrix-vector product.

set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check-out}
WORK=${WORK:-/tmp/llava-gpu-check}
PEAK_BANDWIDTH=${PEAK_BANDWIDTH:-3.35e12}
RUNS=${RUNS:-2}
BUDGET=${BUDGET:-345}  # seconds for the whole script
MAX_TOKENS=${MAX_TOKENS:-128}
PRESET=${PRESET:-7b}  # "mid" rehearses the script on a CPU in ~2 minutes
mkdir -p "$OUT" "$WORK"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
START=$(date +%s)
LOG="$OUT/gpu.log"
: > "$LOG"

log() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# step NAME LIMIT_S COMMAND...: run, time, log; never stops the script. The limit shrinks to what
# is left of $BUDGET seconds (less 20 for the summary); a step with under 20 s left is skipped.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$(( BUDGET - 20 - ($(date +%s) - START) ))
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    if [ "$limit" -lt 20 ]; then
        echo "$name skipped 0" >> "$OUT/steps.txt"
        log "skip $name (budget spent)"
        return 1
    fi
    local t0=$(date +%s)
    log "start $name"
    timeout "$limit" "$@" >> "$LOG" 2>&1
    local rc=$?
    echo "$name $rc $(( $(date +%s) - t0 ))" >> "$OUT/steps.txt"
    log "end $name rc=$rc ($(( $(date +%s) - t0 ))s)"
    return $rc
}

: > "$OUT/steps.txt"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; } \
    >> "$LOG" 2>&1
python -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device(), \
    mx.device_info())" >> "$LOG" 2>&1
df -h "$WORK" >> "$LOG" 2>&1

step make_checkpoint 150 python benchmarks/make_checkpoint.py --out "$WORK/hf" --preset "$PRESET" \
    --dtype float16
step convert_f16 120 python -m mlx_llava.cli.convert --hf-path "$WORK/hf" --mlx-path "$WORK/f16" \
    --dtype float16 --force
step convert_q4 120 python -m mlx_llava.cli.convert --hf-path "$WORK/hf" --mlx-path "$WORK/q4" \
    --dtype float16 -q --q-bits 4 --q-group-size 64 --force
rm -rf "$WORK/hf"  # free the disk (and page cache) before timing
# 4-bit first (speed only), then float16 with the reuse sections (prefix cache, chat, batch of 8)
# once; sections are saved as they finish, so running out of budget loses only the last ones.
for name in q4 f16; do
    sections=single,bandwidth
    if [ "$name" = f16 ]; then sections=single,bandwidth,prefix,chat,batch; fi
    if [ -f "$WORK/$name/config.json" ]; then
        step "bench_$name" 150 python benchmarks/bench.py --model "$WORK/$name" --runs "$RUNS" \
            --load-runs 1 --extra-runs 1 --max-tokens "$MAX_TOKENS" --sections "$sections" \
            --out "$OUT/bench_$name.json"
    fi
done

python - "$OUT" "$PEAK_BANDWIDTH" "$START" <<'EOF'
import json, sys, time
from pathlib import Path

out, peak, start = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
steps = {}
for line in (out / "steps.txt").read_text().splitlines():
    name, rc, seconds = line.split()
    steps[name] = {"rc": rc if rc == "skipped" else int(rc), "seconds": int(seconds)}
result = {"steps": steps, "total_s": int(time.time()) - start, "peak_bandwidth_Bps": peak}
for name in ("f16", "q4"):
    path = out / f"bench_{name}.json"
    if not path.exists():
        continue
    report = json.loads(path.read_text())
    result.setdefault("device", report["device"])
    result.setdefault("versions", report["versions"])
    for key in ("prefix_reuse", "chat", "batch"):
        if key in report:
            result.setdefault(f"{name}_{key}", report[key])
    single = report.get("single", {}).get("mlx-llava")
    bw = report.get("bandwidth", {})
    if not single or "bytes_per_token" not in bw:
        result[name] = {"error": report.get("single", bw)}
        continue
    bound = peak / bw["bytes_per_token"]
    result[name] = {
        "weight_bytes": report["model"]["weight_bytes"],
        "prompt_tokens": single["prompt_tokens"],
        "load_s": single["load_s"],
        "vision_encode_s": single["vision_encode_s"],
        "ttft_s": single["ttft_s"],
        "prefill_tps": single["prefill_tps"],
        "decode_tps": single["decode_tps"],
        "generate_peak_bytes": single["generate_peak_bytes"],
        "bytes_per_token": bw["bytes_per_token"],
        "bound_tps_peak_bandwidth": bound,
        "fraction_of_peak_bound": single["decode_tps"] / bound,
        "bound_tps_measured_matvec": bw["bound_tps"],
        "measured_bandwidth_GBps": bw["measured_bandwidth_gbs"],
        "fraction_of_measured_bound": bw["fraction_of_bound"],
        "decode_tps_bandwidth_section": bw["decode_tps"],
        "mlx_lm_decode_tps": bw.get("mlx_lm_decode_tps"),
        "decode_vs_mlx_lm": bw.get("decode_vs_mlx_lm"),
    }
(out / "gpu.json").write_text(json.dumps(result, indent=2))
print(json.dumps(result, indent=2))
EOF
log "done"
