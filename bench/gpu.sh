#!/usr/bin/env bash
# The GPU checks, most valuable first, each under its own time limit inside one overall budget:
#   1. build the cut cross-entropy extension with its CUDA kernels (TORCH_CUDA_ARCH_LIST, default 9.0);
#   2. the CUDA cases of tests/cce (the kernels against the float64 reference, filtering, gradients);
#   3. bench/cce.py on CUDA: bf16, the Gemma-2-shaped head (D=2304, V=256000), every implementation,
#      apple's Triton kernels and torch_compile path included when cut-cross-entropy is installed;
#   4. configs/cifar10_fast.yaml over seeds (bench/seeds.py; --amp auto on CUDA = fp16 with a grad scaler);
#   5. the same recipe, seed 0, with bf16 autocast and in float32;
#   6. configs/cifar10_fast_long.yaml (airbench95's recipe) over 3 seeds;
#   7. configs/cifar10_resnet18.yaml for 30 epochs, seed 0, if time is left.
# usage: bench/gpu.sh <output folder> [datasets folder, default ../shared/datasets] [budget seconds, default 560]
#        [steps, default "build cuda-tests cce fast fast-precision long resnet18"]
# Writes <output>/gpu.log (everything) and <output>/seeds.json; builds and runs go to ${TMPDIR:-/tmp}.
set -u
out=${1:?usage: bench/gpu.sh <output folder> [datasets folder] [budget seconds]}
data=${2:-../shared/datasets}
budget=${3:-560}
steps=" ${4:-build cuda-tests cce fast fast-precision long resnet18} "
py=${PYTHON:-python3}
tmp=${TMPDIR:-/tmp}/lossbench-gpu
mkdir -p "$out" "$tmp"
export PYTHONUNBUFFERED=1 LOSSBENCH_EXT_DIR=${LOSSBENCH_EXT_DIR:-$tmp/ext}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-8}
start=$(date +%s)
log=$out/gpu.log
: > "$log"

left() { echo $(( budget - ($(date +%s) - start) )); }
# step NAME MAX_SECONDS COMMAND...: runs COMMAND for at most MAX_SECONDS and what the budget leaves.
step() {
  local name=$1 max=$2 limit t0 rc
  shift 2
  [[ $steps == *" ${name%%:*} "* ]] || return 0
  limit=$(left)
  (( limit > max )) && limit=$max
  if (( limit < 20 )); then echo "== $name: skipped, budget spent" | tee -a "$log"; return 0; fi
  echo "== $name (limit ${limit}s): $*" | tee -a "$log"
  t0=$(date +%s)
  timeout -k 5 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  echo "== $name: exit $rc after $(( $(date +%s) - t0 ))s" | tee -a "$log"
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $py -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name())"
  $py -c "import cut_cross_entropy, triton; print('cut-cross-entropy', getattr(cut_cross_entropy, '__version__', '?'), 'triton', triton.__version__)" 2>&1 | tail -1
} 2>&1 | tee -a "$log"

step build 300 $py -m lossbench.cce.build --cuda
step cuda-tests 150 $py -m pytest -q -rs -p no:cacheprovider tests/cce -k cuda
grep -E "passed|failed|error" "$log" | tail -2
step cce:bf16-gemma2 170 $py bench/cce.py --device cuda --dtype bfloat16 --n 8192 --d 2304 --vocab 256000 --reps 5 --timeout 100
sed -n '/^dense, bfloat16/,/^$/p' "$log"

fast=(-c configs/cifar10_fast.yaml --data "imagefolder:$data/cifar10-jpeg-full" --test-folder "$data/cifar10-jpeg-subset/test" --cache-dir "$tmp/cache" --no-progress)
step fast 200 $py bench/seeds.py "${fast[@]}" --output "$tmp/fast" --seeds 0 1 2 3 4 5 6 7 8 9 --max-seconds 150 --json "$out/seeds.json"
step fast-precision:bf16 40 $py bench/seeds.py "${fast[@]}" --output "$tmp/fast-bf16" --seeds 0 --amp on --amp-dtype bfloat16
step fast-precision:fp32 45 $py bench/seeds.py "${fast[@]}" --output "$tmp/fast-fp32" --seeds 0 --no-amp
step long 150 $py bench/seeds.py -c configs/cifar10_fast_long.yaml --data "imagefolder:$data/cifar10-jpeg-full" --test-folder "$data/cifar10-jpeg-subset/test" --cache-dir "$tmp/cache" --no-progress --output "$tmp/long" --seeds 0 1 2 --max-seconds 100 --json "$out/seeds_long.json"
grep -E "^\| (seed|[0-9]|mean)|seeds on" "$log"
step resnet18 300 $py bench/seeds.py -c configs/cifar10_resnet18.yaml --data "imagefolder:$data/cifar10-jpeg-full" --test-folder "$data/cifar10-jpeg-subset/test" --cache-dir "$tmp/cache" --epochs 30 --amp auto --no-progress --output "$tmp/r18" --seeds 0
grep -E "^epoch" "$log" | tail -3
echo "total $(( $(date +%s) - start ))s" | tee -a "$log"
