#!/usr/bin/env bash
# Evidence for dense prediction (issue 21, benchmarks/RESULTS.md): mean IoU and COCO mAP on the embedded
# fashion-mnist-scenes of a demo-size BEiT (the demo ViT's shape, 4 x 128 at 32 px with 4 px patches, as BEiT so that
# transformers has a backbone class for it) and of the `convnextv2-demo` preset, each pretrained with the demo recipe
# (configs/pretrain/demo.yaml: 1,000 steps of 64 Fashion-MNIST images), against the same architecture at random init.
# Writes runs/dense-evidence/*.json and prints one table. CPU: about an hour; pass STEPS=100 for a quick look.
# Extra arguments go to every evaluate.py call, e.g. `--train_samples 200` for a label-efficiency point.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
STEPS=${STEPS:-1000}
EPOCHS=${EPOCHS:-20}  # fine-tuning epochs of every dense evaluation
MODELS=${MODELS:-"beit-demo convnextv2-demo"}  # e.g. MODELS=beit-demo for one encoder
OUT=runs/dense-evidence
mkdir -p "$OUT"
if [ ! -f runs/demo-data/prepare_data.json ]; then
  python scripts/prepare_data.py --source fashion-mnist --output runs/demo-data --num_shards 8 --overwrite true
fi
# The demo ViT's dimensions as a BEiT (the official SimMIM ViT-B is a BEiT too), and the ConvNeXt V2 demo preset.
BEIT_DEMO="image_size=32,patch_size=4,hidden_size=128,num_hidden_layers=4,num_attention_heads=4,intermediate_size=256"
declare -A PRETRAIN=(
  [beit-demo]="--preset beit-base-patch16-224 --mask_patch_size 8 --image_stats dataset --config_overrides $BEIT_DEMO"
  [convnextv2-demo]="--preset convnextv2-demo"
)
for name in $MODELS; do
  if [ ! -f "$OUT/$name/encoder/config.json" ]; then
    # shellcheck disable=SC2086
    python scripts/pretrain.py --config configs/pretrain/demo.yaml ${PRETRAIN[$name]} \
      --max_steps "$STEPS" --output_dir "$OUT/$name" --report_to none
  fi
  for protocol in segmentation detection; do
    for init in pretrained random; do
      flag=(); [ "$init" = random ] && flag=(--random_init)
      python scripts/evaluate.py --model "$OUT/$name/encoder" --dataset_name fashion-mnist-scenes \
        --protocols "$protocol" --epochs "$EPOCHS" --batch_size 32 --learning_rate 1e-3 --seed 0 \
        --update_model_card false "${flag[@]}" --output "$OUT/$name-$protocol-$init.json" "$@"
    done
  done
done
python - "$OUT" <<'EOF'
import json, pathlib, sys
rows = []
for path in sorted(pathlib.Path(sys.argv[1]).glob("*-*-*.json")):
    payload = json.loads(path.read_text())
    values = {r["metric"]: r["value"] for r in payload["results"]}
    rows.append((path.stem, values))
print("| run | metric values |\n|---|---|")
for stem, values in rows:
    print(f"| {stem} | " + ", ".join(f"{k} {100 * v:.1f}" for k, v in values.items()) + " |")
EOF
