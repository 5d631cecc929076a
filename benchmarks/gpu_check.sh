#!/usr/bin/env bash
# One short GPU check (at most about 8 minutes on one H100/H200-class GPU), one line per figure.
#
#   bash benchmarks/gpu_check.sh            # in an environment where nnunet-sddm is installed
#
# 1. guided-sampling throughput of paper128 (128 x 128, N = 25, K = 100) against the batch-1 fp32
#    reference loop (DDA's): bf16 and fp32, batch 64 and 256; projection guidance in the same runs;
#    FLOPs per slice step, achieved FLOP/s, the measured matrix-product peak, peak memory;
# 2. diffusion training images/s of paper128 (bf16, channels_last) against a bare PyTorch loop of
#    the same model, without and with torch.compile;
# 3. a two-process torchrun smoke of nnUNetv2_sddm_adapt on one GPU, checked bit-identical to the
#    single-process result.
# Full logs go to ${OUT:-a temporary folder}; the goal is >= 50 slices/s for gradient guidance.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG="${OUT:-$(mktemp -d)}"
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1 nnUNet_compile=0
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "gpu_check: no CUDA device is available"; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/gpu: /'
python -c "import torch, nnunet_sddm; print('software: torch', torch.__version__, '| cuda', torch.version.cuda, '| nnunet_sddm', nnunet_sddm.__version__)"

step() {  # step NAME TIMEOUT_S COMMAND...: run with a time limit, keep the log, print the figure lines
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$LOG/$name.log" 2>&1
    local rc=$?
    grep -E "slices/s|speedup|projection_vs|flops|peak|images/s|ratio_to_bare|identical" "$LOG/$name.log" \
        | sed "s/^ */$name: /"
    echo "$name: exit $rc, $((SECONDS - t0)) s"
}

# 1. sampling throughput (the reference loop: 8 slices at batch 1; the project: 256 slices)
for amp in bf16 fp32; do
    for batch in 64 256; do
        step "adapt_${amp}_b${batch}" 150 python benchmarks/adapt_throughput.py --device cuda --presets paper128 \
            --slices 256 --reference-slices 8 --batch-size "$batch" -N 25 --steps 100 --amp "$amp"
    done
done

# 2. diffusion training throughput
step train_bf16 90 python benchmarks/train_throughput.py --preset paper128 --device cuda --amp bf16
step train_bf16_compile 150 python benchmarks/train_throughput.py --preset paper128 --device cuda --amp bf16 --compile

# 3. two-process torchrun smoke on one GPU (gloo carries the collectives: NCCL refuses two ranks per GPU)
SMOKE="$LOG/smoke"
python - "$SMOKE" <<'EOF'
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from nnunet_sddm.diffusion.model_folder import create_model_folder

root = Path(sys.argv[1])
(root / "in").mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
for i in range(4):
    vol = rng.normal(100, 30, (96, 80, 6)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.diag([1.4, 1.4, 8.0, 1.0])), str(root / "in" / f"case{i}_0000.nii.gz"))
create_model_folder(root / "model", preset="tiny", seed=0)
EOF
ADAPT="$(command -v nnUNetv2_sddm_adapt)"
step adapt_single 120 "$ADAPT" -i "$SMOKE/in" -o "$SMOKE/single" -m "$SMOKE/model" -N 5 --steps 20 --device cuda --quiet
step adapt_torchrun 120 torchrun --standalone --nproc_per_node 2 "$ADAPT" -i "$SMOKE/in" -o "$SMOKE/ranks" \
    -m "$SMOKE/model" -N 5 --steps 20 --device cuda --quiet
python - "$SMOKE" <<'EOF'
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

root = Path(sys.argv[1])
names = sorted(p.name for p in (root / "single").glob("*.nii.gz"))
same = names and all(np.array_equal(nib.load(str(root / "single" / n)).get_fdata(),
                                    nib.load(str(root / "ranks" / n)).get_fdata()) for n in names)
print(f"torchrun_smoke: {len(names)} cases, 2 ranks on one GPU, {'bit-identical' if same else 'NOT identical'} "
      f"to the single process")
EOF
echo "gpu_check: logs in $LOG"
