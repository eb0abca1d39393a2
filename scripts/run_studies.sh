#!/usr/bin/env bash
# The CPU-scale studies committed under results/ (see REPRODUCING.md): runs them into
# outputs/study/ and copies their tidy CSVs (and resolved configs) to results/<study>/.
# Then `python experiments/figures.py results/` redraws every figure from those CSVs.
# Usage: scripts/run_studies.sh [seeds, default "0 1 2"]   (about an hour on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
P=.venv/bin/python
C="threads=1 progress=false logger.mode=disabled"
S=outputs/study
seeds="${1:-0 1 2}"
run() { local dir=$1; shift; [ -f "$S/$dir/.done" ] || { "$P" "$@" $C hydra.run.dir="$S/$dir" && touch "$S/$dir/.done"; }; }
for s in $seeds; do
  run alexnet_small-shapes/seed$s experiments/prune.py experiment=all_criteria seed=$s
done
run alexnet_small-shapes/interpret_seed0 experiments/interpret.py experiment=all_criteria \
    interpret.source=$S/alexnet_small-shapes/seed0
run alexnet_small-shapes_colorlabel/seed0 experiments/prune.py experiment=all_criteria \
    data.color_label=true
run alexnet_small-shapes_colorlabel/interpret_seed0 experiments/interpret.py \
    experiment=all_criteria data.color_label=true \
    interpret.source=$S/alexnet_small-shapes_colorlabel/seed0
for layer in conv1 conv2; do
  run alexnet_small-shapes/compress_$layer experiments/compress.py \
      source.curves=$S/alexnet_small-shapes/seed0/curves.csv source.layer=$layer
  run alexnet_small-shapes/compress_${layer}_s80b3 experiments/compress.py \
      source.curves=$S/alexnet_small-shapes/seed0/curves.csv source.layer=$layer \
      layer_compression.sparsity=0.8 layer_compression.bits=3
done
run resnet_small-shapes-global/seed0 experiments/prune.py experiment=resnet_small_global
run resnet_small-shapes-global/compress experiments/compress.py model=resnet_small \
    source.curves=$S/resnet_small-shapes-global/seed0/curves.csv layer_compression.enabled=false
run lenet5-fashion_mnist/seed0 experiments/prune.py experiment=all_criteria model=lenet5 \
    data=fashion_mnist
# copy the tidy results: one folder per study, one subfolder per run
for d in "$S"/*/*/; do
  rel=${d#"$S"/}; mkdir -p "results/$rel"
  cp "$d"/*.csv "results/$rel" 2>/dev/null || true
  cp "$d"/gallery_*.png "results/$rel" 2>/dev/null || true  # need the model: not redrawn
  [ -f "$d/.hydra/config.yaml" ] && cp "$d/.hydra/config.yaml" "results/$rel/config.yaml"
done
"$P" experiments/aggregate.py results/alexnet_small-shapes  # the seeds in one table + summary
"$P" experiments/figures.py results/
