#!/usr/bin/env bash
# The main job on real faces (docs/demo.md): LFW -> .rec + held-out .bin -> 2-process DeepSpeed
# training with Partial FC -> ONNX export with parity check -> ONNX verification, ROC and curves.
# Usage: bash tools/run_demo.sh [key=value overrides for the training config]
#   full demo (10-18 min on 2 quiet CPU cores): bash tools/run_demo.sh
#   CI smoke version (about 3 min):           DEMO_OUT=work_dirs/lfw_demo_ci DEMO_SKIP_UNTRAINED=1 \
#       bash tools/run_demo.sh schedule.max_steps=30 data.batch_size=32 eval.val_targets=[] \
#       logging.frequent=5
# Env: ARCSCALE_LFW (default ../shared/data/lfw), DEMO_OUT (default work_dirs/lfw_demo_r18),
#      DEMO_CONFIG (default configs/lfw_demo_r18.yaml), DEMO_ACCELERATE (accelerate config),
#      DEMO_SKIP_UNTRAINED=1 skips the random-init baseline (saves about a minute),
#      DEMO_PORT (rendezvous port of the training launch, default 29500),
#      DEMO_DATA (the prepared LFW split, default work_dirs/lfw_demo; rebuilt only when stale).
set -euo pipefail
cd "$(dirname "$0")/.."
LFW=${ARCSCALE_LFW:-$(cd .. && pwd)/shared/data/lfw}
OUT=${DEMO_OUT:-work_dirs/lfw_demo_r18}
CONFIG=${DEMO_CONFIG:-configs/lfw_demo_r18.yaml}
ACCEL=${DEMO_ACCELERATE:-accelerate_configs/cpu_2proc_zero2.yaml}
DATA=${DEMO_DATA:-work_dirs/lfw_demo}
PY=.venv/bin/python
# DeepSpeed must agree with torch about CUDA (trainer/engine.py resolve_device): CPU only then.
if ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    export DS_ACCELERATOR=cpu
fi
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-${ARCSCALE_CACHE:-$HOME/.cache/arcscale}/torch_extensions}
start=$(date +%s)
stage_start=$start
timings=""
stage_done() {  # records the wall time of the stage that just finished
    local now
    now=$(date +%s)
    timings+="  $1: $((now - stage_start)) s"$'\n'
    stage_start=$now
}

echo "== 1/5 prepare LFW ($LFW -> $DATA)"
$PY tools/prepare_lfw.py --lfw "$LFW" --out "$DATA" --no-progress
stage_done prepare

echo "== 2/5 train ($CONFIG, $ACCEL)"
rm -rf "$OUT"
.venv/bin/accelerate launch --config_file "$ACCEL" --main_process_port "${DEMO_PORT:-29500}" \
    -m trainer.train "$CONFIG" \
    output="$OUT" data.rec="$DATA" logging.progress_bar=false "$@"
stage_done train

echo "== 3/5 export ONNX"
$PY tools/convert_to_onnx.py "$OUT" --output "$OUT/backbone.onnx" --lfw-bin "$DATA/lfw_heldout.bin" \
    --runs 10
stage_done export

echo "== 4/5 evaluate the ONNX model on the held-out pairs"
$PY tools/eval_verification.py --model "$OUT/backbone.onnx" --bin "$DATA/lfw_heldout.bin" \
    --out "$OUT/eval" --batch-size 128
stage_done eval_onnx
if [ "${DEMO_SKIP_UNTRAINED:-0}" != 1 ]; then
    echo "== 4/5 the same network untrained (random init), for comparison"
    $PY tools/eval_verification.py --untrained --config "$OUT/config.yaml" \
        --bin "$DATA/lfw_heldout.bin" --out "$OUT/eval_untrained" --batch-size 128
    stage_done eval_untrained
fi

echo "== 5/5 plot training curves"
$PY tools/plot_curves.py "$OUT" --out "$OUT/curves.png"
stage_done plot
echo "== stage wall times:"
printf '%s' "$timings"
echo "== done in $(($(date +%s) - start)) s: $OUT/eval/roc.png $OUT/curves.png"
