#!/usr/bin/env bash
# GPU check: both benchmarks on CUDA in bf16, plus CBSA under torch.compile (inductor) against eager.
#
#   scripts/gpu_check.sh [OUT_DIR]          # default OUT_DIR: ./runs/gpu_check
#
# Needs the project installed in the current Python environment (`pip install -e .`) and one CUDA GPU;
# set PYTHON to choose the interpreter (default: python). Budget: under 5 minutes on an H100-class GPU,
# enforced per step with `timeout` (100 s + 100 s + 80 s, the last for inductor's cold compile); a step
# that runs over fails the script.
# Writes to OUT_DIR:
#   environment.txt                       GPU name, driver, torch/CUDA versions
#   attention/attention_benchmark.{csv,png}, attention.log
#   models/model_benchmark.csv, models.log
#   compile_check.log
set -euo pipefail

OUT="${1:-runs/gpu_check}"
PY="${PYTHON:-python}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mkdir -p "$OUT"

"$PY" - <<'EOF' | tee "$OUT/environment.txt"
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check.sh: torch.cuda.is_available() is False; this check needs a CUDA GPU")
props = torch.cuda.get_device_properties(0)
print(f"gpu: {props.name}, {props.total_memory / 2**30:.1f} GiB, capability {props.major}.{props.minor}")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
print(f"bf16 supported: {torch.cuda.is_bf16_supported()}")
EOF
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >> "$OUT/environment.txt" || true
fi

echo "== attention layers (bf16 autocast, batch 16) =="
timeout 100 "$PY" "$HERE/benchmark_attention.py" --device cuda --dtype bf16 --batch 16 --repeats 5 \
    --out "$OUT/attention" 2>&1 | tee "$OUT/attention.log"

echo "== models: CBT-T/S vs ViT-T/S at 224 and 512 (bf16 autocast, batch 64, channels-last) =="
timeout 100 "$PY" "$HERE/benchmark_models.py" --device cuda --dtype bf16 --batch 64 --repeats 5 --warmup 2 \
    --channels-last --out "$OUT/models" 2>&1 | tee "$OUT/models.log"

echo "== CBSA under torch.compile (inductor, fullgraph) vs eager, bf16 autocast =="
timeout 80 "$PY" - <<'EOF' 2>&1 | tee "$OUT/compile_check.log"
import torch
from cbsa_core import CBSA

torch.manual_seed(0)
layer = CBSA(384, 6, 64).cuda()
x = torch.randn(8, 1 + 32 * 32, 384, device="cuda", requires_grad=True)
g = torch.randn(8, 1 + 32 * 32, 384, device="cuda")


def run(mod):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = mod(x, grid_size=(32, 32))
    grads = torch.autograd.grad(out, [x, *layer.parameters()], g.to(out.dtype))
    return out.float(), [gr.float() for gr in grads]


compiled = torch.compile(layer, fullgraph=True)
out_c, grads_c = run(compiled)
out_e, grads_e = run(layer)
rel = lambda a, b: ((a - b).norm() / b.norm().clamp_min(1e-12)).item()  # noqa: E731
worst = max([rel(out_c, out_e)] + [rel(a, b) for a, b in zip(grads_c, grads_e)])
print(f"compiled vs eager, relative error of output and gradients: max {worst:.2e}")
if worst > 5e-2:
    raise SystemExit("gpu_check.sh: compiled CBSA disagrees with eager")
print("compile check: OK")
EOF

echo "gpu_check.sh: done; outputs in $OUT"
