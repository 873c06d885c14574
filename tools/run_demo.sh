#!/usr/bin/env bash
# The main job on real faces (docs/demo.md): LFW -> .rec + held-out .bin -> 2-process DeepSpeed
# training with Partial FC -> ONNX export with parity check -> ONNX verification, ROC and curves.
# Usage: bash tools/run_demo.sh [key=value overrides for the training config]
# Env: ARCSCALE_LFW (default ../shared/data/lfw), DEMO_OUT (default work_dirs/lfw_demo_mbf),
#      DEMO_CONFIG (default configs/lfw_demo_mbf.yaml), DEMO_ACCELERATE (accelerate config).
set -euo pipefail
cd "$(dirname "$0")/.."
LFW=${ARCSCALE_LFW:-$(cd .. && pwd)/shared/data/lfw}
OUT=${DEMO_OUT:-work_dirs/lfw_demo_mbf}
CONFIG=${DEMO_CONFIG:-configs/lfw_demo_mbf.yaml}
ACCEL=${DEMO_ACCELERATE:-accelerate_configs/cpu_2proc_zero2.yaml}
DATA=work_dirs/lfw_demo
PY=.venv/bin/python
if ! nvidia-smi >/dev/null 2>&1; then export DS_ACCELERATOR=cpu; fi
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/arcscale/torch_extensions}
start=$(date +%s)

echo "== 1/4 prepare LFW ($LFW -> $DATA)"
$PY tools/prepare_lfw.py --lfw "$LFW" --out "$DATA"

echo "== 2/4 train ($CONFIG, $ACCEL)"
rm -rf "$OUT"
.venv/bin/accelerate launch --config_file "$ACCEL" -m trainer.train "$CONFIG" \
    output="$OUT" data.rec="$DATA" "$@"

echo "== 3/4 export ONNX"
$PY tools/convert_to_onnx.py "$OUT" --output "$OUT/backbone.onnx" --lfw-bin "$DATA/lfw_heldout.bin"

echo "== 4/4 evaluate the ONNX model on the held-out pairs"
network=$($PY -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['model']['network'])" "$OUT/config.yaml")
$PY tools/eval_verification.py --model "$OUT/backbone.onnx" --bin "$DATA/lfw_heldout.bin" --out "$OUT/eval"
$PY tools/eval_verification.py --untrained --network "$network" --config "$OUT/config.yaml" \
    --bin "$DATA/lfw_heldout.bin" --out "$OUT/eval_untrained"
$PY tools/plot_curves.py "$OUT" --out "$OUT/curves.png"
echo "== done in $(( $(date +%s) - start )) s: $OUT/eval/roc.png $OUT/curves.png"
