#!/usr/bin/env bash
# Restage's GPU benchmarks in one go on a one-GPU machine (issue 18), real-size
# architectures with random weights, no Ray. Each section has its own time limit, so one
# that fails or runs long does not cost the others; results go to RESULTS.
#
#   bash bench/gpu_suite.sh [SECTION ...]  # train multi_lora swap slots roles prefetch
#                                          # personalize_data personalize
#   bash bench/gpu_suite.sh next1          # the figures issues 18 and 16 still lack, in
#   bash bench/gpu_suite.sh next2          # device calls of under 10 minutes each, most
#   bash bench/gpu_suite.sh next3          # wanted first; make each call right after the
#                                          # last (next2 and next3 need the checkpoint that
#                                          # next1's train saves under WORK)
# (swap and prefetch load the checkpoint that train saves under WORK: run train first)
#
# Environment: RESULTS (default bench/results), WORK (scratch: the saved SDXL checkpoint,
# ~7 GB), TAG (file-name suffix, default: the GPU's name), SCRIPT (a copy of diffusers'
# examples/dreambooth/train_dreambooth_lora_sdxl.py; the H200 run used the one at diffusers
# commit 58eb52c080 with diffusers 0.42.1), PHOTOS (the DreamBooth folder).
# On the H200 the four default sections took 159 + 173 + 62 s (roles not run yet);
# personalize (--size base) took 152 s for one of its 10 products before the crops moved
# to the device.
set -u
RESULTS=${RESULTS:-bench/results}
WORK=${WORK:-/tmp/restage-gpu}
TAG=${TAG:-$(python3 -c "import torch; print(torch.cuda.get_device_name(0).split()[-1].lower())")}
SCRIPT=${SCRIPT:-.devdata/train_dreambooth_lora_sdxl.py}
PHOTOS=${PHOTOS:-../shared/data/dreambooth}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$RESULTS" "$WORK"
SDXL=(--set "generator.source=$WORK/sdxl" --set generator.variant=null --set generator.vae=null
      --set offline=true)

section() {  # NAME LIMIT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name: start $(date +%T), limit ${limit}s"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | grep --line-buffered -v -E "it/s\]$|s/it\]$"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0))s"
}

# The unmeasured goals first (training at 2x with the LoRA computed in bf16; the swap under
# 5 % of a request), then the figures; each call's limits add up to under 600 s.
NEXT1="train slots"                # limits 360 + 150 s (the H200 took 159 s for train)
NEXT2="swap roles"                 # 100 + 240 s (swap took 62 s)
NEXT3="prefetch personalize_data"  # 300 + 200 s; then personalize (540 s) alone
for s in "${@:-train multi_lora swap roles}"; do
  case $s in next1) s=$NEXT1 ;; next2) s=$NEXT2 ;; next3) s=$NEXT3 ;; esac
  for name in $s; do
    case $name in
      train)  # also saves the SDXL checkpoint that swap and roles load
        section train 360 python3 bench/gpu_train.py --script "$SCRIPT" --photos "$PHOTOS" \
          --work "$WORK" --steps 20 --out "$RESULTS/gpu_train_$TAG.json" ;;
      multi_lora)
        section multi_lora 230 python3 bench/multi_lora.py --size sdxl --device cuda \
          --k 2 4 8 --steps 4 --samples 8 --repeats 1 --out "$RESULTS/multi_lora-sdxl-$TAG.json" ;;
      swap)
        section swap 100 python3 bench/adapter_swap.py --profile default --device cuda \
          --rank 64 "${SDXL[@]}" --json "$RESULTS/adapter_swap_sdxl_$TAG.json" ;;
      slots)  # the serving slots against peft's hot-swap at SDXL size; no checkpoint needed
        section slots 150 python3 bench/slot_swap.py --device cuda \
          --out "$RESULTS/slot_swap_sdxl_$TAG.json" ;;
      roles)
        section roles 240 python3 bench/gpu_roles.py --profile default --device cuda \
          --out "$RESULTS/roles_gpu.json" ;;
      prefetch)  # 40 distinct rank-64 files (177 MiB each), hard-linked up to 1,000 stored
        section prefetch 300 python3 bench/serve_prefetch.py --profile default --device cuda \
          --rank 64 --distinct 40 --requests 48 "${SDXL[@]}" \
          --out "$RESULTS/serve_prefetch_sdxl_$TAG.json" ;;
      personalize_data)  # the data side and whole DINOv2-B/14 steps, host vs device crops
        section personalize_data 200 python3 bench/personalize_data.py --size base \
          --device cuda --out "$RESULTS/personalize_data_base_$TAG.json" ;;
      personalize)  # 3 of the 10 products trained (all 10 in the gallery)
        section personalize 540 python3 bench/personalize.py --size base --device cuda \
          --splits 1 --train-products 3 --photos "$PHOTOS" \
          --out "$RESULTS/personalize_base_$TAG.json" ;;
      *) echo "unknown section $name (train multi_lora swap slots roles prefetch" \
           "personalize_data personalize)"; exit 2 ;;
    esac
  done
done
