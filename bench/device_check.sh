#!/usr/bin/env bash
# Issue 17's GPU figures, one family per device call (the lease is 15 minutes, all tries together).
#
# Here, once per session (both folders are git-ignored through .git/info/exclude):
#   bash ../shared/bench/device-wheels.sh            # diffusers, pydantic... into .whl/
#   mkdir -p .ref && cp ../shared/bench/reference_step.py .ref/ && grep -qx /.ref/ .git/info/exclude \
#     || echo /.ref/ >> .git/info/exclude
#   bash bench/device_check.sh smoke                  # the same script on the CPU, tiny models: ~2 minutes
# Then the device tool: command "bash bench/device_check.sh sd1", carry [".whl", ".ref"], timeout_s 560;
# then "equal" (timeout_s 330), then "sdxl" (560). The lease is 15 minutes with the machine's start, so one
# session gets sd1 and equal, or sdxl alone. Everything lands in $OUT as it is measured, so a cut-off call still
# returns figures:
#   train_step_gpu_<part>.json  bench/gpu_step.py: reference and ours (eager, CUDA graphs), images/s, MFU,
#                               peak GiB (allocator and nvidia-smi), syncs per loop, the low-VRAM preset
#   profile.ours_*_bs4.txt      torch-profiler tables of ours' eager batch-4 loop (where the step's time goes)
#   second_start_<part>.json    the compiled case again in a fresh process: its first step reuses inductor's cache
#   compile_equality_gpu.json   bench/compile_equality.py: compiled and CUDA-graph training against eager, fp32
#                               and bf16, with gradient accumulation too (the check that would lift its guard)
#   step_ops_gpu.json           bench/step_ops.py: CUDA kernels of one step with and without peft's input casts
#   log_<part>.txt              everything printed
# Afterwards, here: copy the JSON files into bench/results/ and remake the README's table with
#   python bench/gpu_table.py bench/results/train_step_gpu_sd1.json bench/results/train_step_gpu_sdxl.json \
#       --second-start bench/results/second_start_*.json --readme README.md
set -u
part=${1:-sd1}
out=${OUT:-/tmp/device-check}
mkdir -p "$out"
log="$out/log_$part.txt"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false LORA_STUDIO_HOME=/tmp/lora-studio-home
if [ "$part" = smoke ]; then
    python=${PYTHON:-.venv/bin/python}
    $python bench/gpu_step.py --reference ../shared/bench/reference_step.py --smoke --runs 1 --steps 2 \
        --json "$out/train_step_gpu_smoke.json" --profile "$out/profile.txt" 2>&1 | tee "$log"
    [ "${PIPESTATUS[0]}" = 0 ] || exit 1
    $python bench/compile_equality.py --steps 2 --modes --json "$out/compile_equality_smoke.json" 2>&1 | tee -a "$log"
    exit "${PIPESTATUS[0]}"
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 -c "import torch, diffusers, peft, transformers; print(torch.__version__, diffusers.__version__, \
peft.__version__, transformers.__version__)"
} 2>&1 | tee "$log"
if [ "$part" = equal ]; then
    timeout 280 python3 bench/compile_equality.py --json "$out/compile_equality_gpu.json" 2>&1 | grep -v "Warning" \
        | tee -a "$log"
    # CUDA kernels of one SD1.5 step with and without peft's input casts (lora.skip_input_casts); ~30 s
    timeout 45 python3 bench/step_ops.py --device cuda --json "$out/step_ops_gpu.json" 2>&1 | grep -v "Warning" \
        | tee -a "$log"
    date -u | tee -a "$log"
    exit
fi
case "$part" in
    sd1) runs=(--families sd1 --runs 3); again=ours_sd15_ro_bs4; budget=400 ;;
    sdxl) runs=(--families sdxl --sdxl-runs 2); again=ours_sdxl_ro_bs1; budget=420 ;;
    *) echo "usage: bench/device_check.sh smoke|sd1|equal|sdxl" >&2; exit 2 ;;
esac
timeout "$budget" python3 bench/gpu_step.py --reference .ref/reference_step.py "${runs[@]}" \
    --json "$out/train_step_gpu_$part.json" --profile "$out/profile.txt" 2>&1 | grep -v "Warning" | tee -a "$log"
# A second process, same compiled case: torch's caches on disk (inductor, autotuning) should cut its first step.
timeout 120 python3 bench/gpu_step.py --reference .ref/reference_step.py "${runs[@]::2}" --runs 1 --sdxl-runs 1 \
    --only "$again" --json "$out/second_start_$part.json" 2>&1 | grep -v "Warning" | tee -a "$log"
date -u | tee -a "$log"
