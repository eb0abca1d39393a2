#!/usr/bin/env bash
# The CPU-scale studies committed under results/ (see REPRODUCING.md): runs them into
# outputs/study/, copies their tidy CSVs (and resolved configs and overrides) to
# results/<study>/<run>/, aggregates each study over its seeds, redraws every figure and writes
# the verdict table (results/verdicts.csv and verdicts.md).
#
# Usage: scripts/run_studies.sh [study ...]     (default: all, in this order)
#        CHECK=1 scripts/run_studies.sh [study ...]   only check that every job's config composes
#   main       alexnet_small on shapes_hard, all nine criteria, seeds 0-4     (~40 min)
#   interpret  color/shape counts (weight and response color index), galleries,
#              class importance, diversity of the main runs                   (~5 min)
#   control    main + interpret with color in the label (40 classes)          (~55 min)
#   fashion    alexnet_small on Fashion-MNIST (real images), seeds 0-4        (~40 min)
#   lenet      LeNet-5 on Fashion-MNIST, seeds 0-4                            (~17 min)
#   resnet     small ResNet, network-wide over 7 single-conv layers, seed 0   (~45 min)
#   units      small ResNet, network-wide over every unit (residual streams), 4 removals per
#              step, SEEDS                                     (~30 min per seed)
#   units_step the step size of units: car and loss with 1 and with 4 removals per step over
#              the first STEP_REMOVALS removals, STEP_SEEDS    (~20 min per seed)
#   retrain    every criterion's pruned networks of main fine-tuned with the same budget,
#              seeds 0-4                                                      (~40 min)
#   retrain_fashion  the same for the fashion runs                            (~25 min)
#   compress   retraining and layer compression of main's CAR, loss and best-baseline
#              (chosen on validation top-1 after retrain) networks, conv1 and conv2, two
#              settings (chosen per criterion on validation top-1), COMPRESS_SEEDS (~40 min)
#   saturated  the contrast: the old easy task scored on training images       (~8 min)
#   sizes      scoring-set size: car, car_random_tie, loss, taylor, l1 at SIZES scoring
#              images, SEEDS; the CAR family and loss also checked on SIZE fresh images for
#              the CHECKED seeds                        (~45 min per checked seed, ~22 other)
#   sizes_fashion  the same on Fashion-MNIST (real images), SEEDS_FASHION  (~20 min per seed)
#   default    the README's default command, kept in results/default_run       (~5 min)
# Times: threads=1 per job (studies are deterministic for it), measured with two or three
# studies sharing a 2-core CPU: about 3.5 hours in all. Two shells can run different studies
# at once (each job writes its own folder; a finished job is skipped on rerun, an
# interrupted one resumes from its saved state).
set -euo pipefail
cd "$(dirname "$0")/.."
P=.venv/bin/python
C="threads=1 progress=false logger.mode=disabled"
S=outputs/study
SEEDS=${SEEDS:-0 1 2 3 4}  # seeds of the multi-seed studies (e.g. SEEDS="0 2" for one shell)
SIZES=${SIZES:-250 1000 4000}  # scoring-set sizes of the sizes study (up to 16000)
CHECKED=${CHECKED:-0 1}    # seeds whose sizes runs also check decisions on fresh images
SEEDS_FASHION=${SEEDS_FASHION:-0 1 2}  # seeds of sizes_fashion
CHECKED_FASHION=${CHECKED_FASHION:-}   # its seeds checked on fresh images (none by default)
COMPRESS_SEEDS=${COMPRESS_SEEDS:-0 1 2}  # seeds of the compress study
STEP_SEEDS=${STEP_SEEDS:-0 1 2}  # seeds of the units_step study
STEP_REMOVALS=${STEP_REMOVALS:-20}  # its removals (units removes 88, 4 per step)
ALL="main interpret control fashion lenet resnet units units_step retrain retrain_fashion compress
     saturated sizes sizes_fashion default"

JOBS=0
run() {  # run <dir> <script> [overrides...]: skipped once done; resumes when interrupted
  local dir=$1; shift
  JOBS=$((JOBS + 1))
  if [ -n "${CHECK:-}" ]; then  # CHECK=1: only compose each job's config (seconds, no run)
    echo "config ok: $*"
    "$P" "$@" $C hydra.run.dir="$S/$dir" --cfg job > /dev/null
    return
  fi
  [ -f "$S/$dir/.done" ] && return
  "$P" "$@" $C hydra.run.dir="$S/$dir" && touch "$S/$dir/.done"
}

collect() {  # collect <study>: copy its runs' CSVs to results/, aggregate, redraw figures
  local study=$1
  [ -n "${CHECK:-}" ] && return
  for d in "$S/$study"/*/; do
    rel=${d#"$S"/}; mkdir -p "results/$rel"
    cp "$d"/*.csv "results/$rel" 2>/dev/null || true
    case "$rel" in  # galleries need the model, so they are not redrawn: seed 0's are kept
      */interpret_seed0/) cp "$d"/gallery_*.png "results/$rel" 2>/dev/null || true ;;
    esac
    [ -f "$d/.hydra/config.yaml" ] && cp "$d/.hydra/config.yaml" "results/$rel/config.yaml"
    [ -f "$d/.hydra/overrides.yaml" ] && cp "$d/.hydra/overrides.yaml" "results/$rel/"
    [ -f "$d/provenance.yaml" ] && cp "$d/provenance.yaml" "results/$rel/"
  done
  "$P" experiments/aggregate.py "results/$study"
  "$P" experiments/figures.py "results/$study"
}

study_main() {
  for s in $SEEDS; do
    run alexnet_small-shapes_hard/seed$s experiments/prune.py experiment=all_criteria seed=$s
  done
}
interpret_runs() {  # interpret_runs <study folder> [overrides...]: both color indices
  local study=$1; shift
  for s in $SEEDS; do
    run $study/interpret_seed$s experiments/interpret.py experiment=all_criteria seed=$s \
        interpret.source=$S/$study/seed$s "$@"
    run $study/interpret_response_seed$s experiments/interpret.py experiment=all_criteria \
        seed=$s interpret.source=$S/$study/seed$s interpret.color.index=response "$@"
  done
}
study_interpret() {
  interpret_runs alexnet_small-shapes_hard
}
study_control() {
  for s in $SEEDS; do
    run alexnet_small-shapes_hard_colorlabel/seed$s experiments/prune.py \
        experiment=all_criteria data.color_label=true seed=$s
  done
  interpret_runs alexnet_small-shapes_hard_colorlabel data.color_label=true
}
study_fashion() {
  for s in $SEEDS; do  # ~8 min each: the real-image study
    run alexnet_small-fashion_mnist/seed$s experiments/prune.py experiment=fashion seed=$s
  done
}
study_lenet() {
  for s in $SEEDS; do
    run lenet5-fashion_mnist/seed$s experiments/prune.py experiment=all_criteria model=lenet5 \
        data=fashion_mnist seed=$s
  done
}
study_resnet() {
  run resnet_small-shapes_hard-global/seed0 experiments/prune.py experiment=resnet_small_global
  run resnet_small-shapes_hard-global/compress experiments/compress.py model=resnet_small \
      source.curves=$S/resnet_small-shapes_hard-global/seed0/curves.csv \
      layer_compression.enabled=false
}
study_units() {
  for s in $SEEDS; do
    run resnet_small-shapes_hard-units/seed$s experiments/prune.py experiment=resnet_small_units \
        seed=$s
  done
  run resnet_small-shapes_hard-units/compress experiments/compress.py model=resnet_small \
      source.curves=$S/resnet_small-shapes_hard-units/seed0/curves.csv source.coupled=true \
      layer_compression.enabled=false
}
study_units_step() {  # k=1 (re-scored after every removal) against k=4, same removals
  for s in $STEP_SEEDS; do
    for k in 1 4; do
      run resnet_small-shapes_hard-units-step/seed$s-k$k experiments/prune.py \
          experiment=resnet_small_units seed=$s method.k=$k method.n_remove=$STEP_REMOVALS \
          method.criteria=[car,loss]
    done
  done
}
study_finetune() {  # finetune <folder> [overrides...]: each seed's criteria, same budget
  local d=$1; shift
  for s in $SEEDS; do
    run $d/finetune_seed$s experiments/finetune.py seed=$s "$@" \
        source.curves=$S/$d/seed$s/curves.csv
  done
}
study_retrain() {
  study_finetune alexnet_small-shapes_hard
}
study_retrain_fashion() {
  study_finetune alexnet_small-fashion_mnist experiment=fashion
}
study_compress() {  # CAR, loss and the best baseline after fine-tuning (by validation top-1;
  local best crit layer s  # finetuned_summary.csv of retrain), two settings, COMPRESS_SEEDS
  best=$("$P" -c "import pandas as pd; d = pd.read_csv('results/alexnet_small-shapes_hard/\
finetuned_summary.csv'); print(d.loc[d.best_baseline, 'criterion'].iloc[0])" 2>/dev/null \
         || echo taylor)  # CHECK=1 before any run: any baseline composes
  for s in $COMPRESS_SEEDS; do
    for crit in car loss $best; do
      for layer in conv1 conv2; do
        for setting in "0.6 4" "0.8 3"; do
          set -- $setting
          run alexnet_small-shapes_hard/compress_${crit}_${layer}_s${1#0.}0b$2_seed$s \
              experiments/compress.py seed=$s source.criterion=$crit source.layer=$layer \
              source.curves=$S/alexnet_small-shapes_hard/seed$s/curves.csv \
              layer_compression.sparsity=$1 layer_compression.bits=$2
        done
      done
    done
  done
}
study_saturated() {
  run saturated-shapes/seed0 experiments/prune.py experiment=saturated
}
size_runs() {  # size_runs <folder> <preset> "<seeds>" "<checked seeds>": per seed and size,
  local d=$1 preset=$2 seeds=$3 checked=$4 k  # the decisions (checked on SIZE fresh images
  for s in $seeds; do                         # for the checked seeds) and the cheap criteria
    for n in $SIZES; do
      k=0; case " $checked " in *" $s "*) k=$n ;; esac
      run $d/seed$s-n$n-decide experiments/prune.py experiment=$preset seed=$s \
          method.scoring.size=$n method.scoring.check=$k method.criteria=[car,car_random_tie,loss]
      run $d/seed$s-n$n-rest experiments/prune.py experiment=$preset seed=$s \
          method.scoring.size=$n method.criteria=[taylor,l1]
    done
  done
}
study_default() {  # the README's default command (torch's thread default), as benchmarked
  JOBS=$((JOBS + 1))
  if [ -n "${CHECK:-}" ]; then
    echo "config ok: experiments/prune.py (default)"
    "$P" experiments/prune.py --cfg job > /dev/null
    return
  fi
  "$P" benchmarks/default_run.py --keep results/default_run
}
study_sizes() {
  size_runs alexnet_small-shapes_hard-sizes scoring_size "$SEEDS" "$CHECKED"
}
study_sizes_fashion() {
  size_runs alexnet_small-fashion_mnist-sizes scoring_size_fashion "$SEEDS_FASHION" \
      "$CHECKED_FASHION"
}

declare -A FOLDER=([main]=alexnet_small-shapes_hard [interpret]=alexnet_small-shapes_hard
                   [control]=alexnet_small-shapes_hard_colorlabel
                   [fashion]=alexnet_small-fashion_mnist [lenet]=lenet5-fashion_mnist
                   [resnet]=resnet_small-shapes_hard-global
                   [units]=resnet_small-shapes_hard-units
                   [units_step]=resnet_small-shapes_hard-units-step
                   [retrain]=alexnet_small-shapes_hard
                   [retrain_fashion]=alexnet_small-fashion_mnist
                   [compress]=alexnet_small-shapes_hard [saturated]=saturated-shapes
                   [sizes]=alexnet_small-shapes_hard-sizes
                   [sizes_fashion]=alexnet_small-fashion_mnist-sizes [default]=default_run)
preflight() {  # preflight <studies>: names, and the data they need, checked before any run
  local study
  for study in "$@"; do
    [ -n "${FOLDER[$study]:-}" ] || { echo "unknown study '$study'; valid: $ALL" >&2; exit 2; }
  done
  [ -n "${CHECK:-}" ] && return  # composing configs reads no data
  for study in "$@"; do
    case "$study" in fashion|lenet|retrain_fashion|sizes_fashion)
      "$P" -c "import sys; from carlib.data.datasets import FASHION_MNIST_SYSTEM_DIR as d, \
fashion_mnist_dir as f; f() or sys.exit(f\"study '$study' needs Fashion-MNIST, which is not in \
{d}: install it first (apt-get install dataset-fashion-mnist)\")" || exit 2
      return ;;
    esac
  done
}
main() {
  preflight ${@:-$ALL}
  for study in ${@:-$ALL}; do
    "study_$study"
    [ "$study" = default ] || collect "${FOLDER[$study]}"
  done
  if [ -n "${CHECK:-}" ]; then echo "$JOBS jobs: every config composes"; return; fi
  "$P" experiments/figures.py results/ > /dev/null  # the all-study figures (differences.png)
  "$P" experiments/verdicts.py results/  # every comparison: results/verdicts.csv and .md
}
# bash reads a script while running it: with the work in functions and `main; exit` on one
# line, editing this file while studies run cannot change what they do
main "$@"; exit
