#!/usr/bin/env bash
# The key throughput measurements for one lent GPU session (15 minutes of device time, start-up included;
# one command at most 10 minutes). Writes to $OUT (default ./bench_out): results.md (the table),
# results.jsonl (every figure, device and versions) and log.txt (everything printed).
#
#   bash bench/run_gpu.sh                  # every job in priority order, until BUDGET_S (default 540 s) is used
#   bash bench/run_gpu.sh train-a-512      # only the named jobs (e.g. the ones a first call skipped)
#
# With the device tool: run(command="bash bench/run_gpu.sh", carry=["bench/wheels"], timeout_s=600); if the
# table lists skipped jobs, run(command="bash bench/run_gpu.sh <their names>", carry=["bench/wheels"]) at once,
# on the still-warm machine. Jobs (priority order), about 8 + 4 minutes in all:
#   train-a-128    ddpm-cifar10 (model A) batch 128 bf16: plain vs ours, plus the plain loop with one technique
#                  switched on at a time (--ablate)
#   sample-ddpm    model A, 1000 DDPM steps, batch 256, fp16: ours vs DDPMPipeline
#   sample-ddim    the same, DDIM 50 steps;  sample-dpm: DPM-Solver++ 20 steps
#   train-b-64     the README model (B) batch 64 bf16: plain vs ours
#   train-a-512    model A batch 512 bf16 with --compile, and a real train_ddpm.py run (--full_run, real
#                  dataset code, 4096 generated images) -- the 7,000 img/s target
#   sample-dpm-compile   sample-dpm with our UNet torch.compiled
#
# diffusers is not installed on the GPU machine and nothing can be downloaded there. Fill bench/wheels here
# first (it is ignored by bench/.gitignore: never commit it):
#   pip download diffusers==0.42.1 --no-deps -d bench/wheels
# The script installs it with --no-deps: its dependencies are on the machine, except importlib_metadata, which
# Python 3.8+ does not need.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-./bench_out}
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-540}
START=$(date +%s)
mkdir -p "$OUT"
: > "$OUT/results.jsonl"
exec > >(tee -a "$OUT/log.txt") 2>&1
export TQDM_DISABLE=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

if ! "$PY" -c "import diffusers" 2>/dev/null; then
  if compgen -G "bench/wheels/*.whl" > /dev/null; then
    "$PY" -m pip install --quiet --no-index --no-deps --find-links bench/wheels diffusers || exit 1
  else
    echo "error: diffusers is not installed and bench/wheels holds no wheel (see the top of this script)"; exit 1
  fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
"$PY" -c "import torch, diffusers, accelerate; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
'accelerate', accelerate.__version__, 'cuda', torch.version.cuda)"

SKIPPED=()
job() {  # job NAME LIMIT_S NEED_S SCRIPT ARGS...: run it under a timeout if NEED_S seconds of the budget are
  local name=$1 limit=$2 need=$3; shift 3  # left, and add its --json to results.jsonl
  if (( ${#SELECTED[@]} )) && [[ ! " ${SELECTED[*]} " == *" $name "* ]]; then return; fi
  local left=$(( BUDGET_S - ($(date +%s) - START) ))
  if (( left < need )); then SKIPPED+=("$name"); echo "{\"job\": \"$name\", \"skipped\": \"time budget\"}" \
    >> "$OUT/results.jsonl"; echo "=== $name: skipped (time budget)"; return; fi
  (( limit > left )) && limit=$left
  echo "=== $name (timeout ${limit}s): $*"
  local tmp; tmp=$(mktemp)
  local t0; t0=$(date +%s)
  timeout -k 15 "$limit" "$PY" "$@" --json "$tmp"
  local rc=$?
  "$PY" - "$tmp" "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$OUT/results.jsonl" <<'EOF'
import json, os, sys
path, name, rc, seconds = sys.argv[1:]
data = json.load(open(path)) if os.path.getsize(path) else {"failed": f"exit {rc}" + (" (timeout)" if rc in ("124", "137") else "")}
print(json.dumps({"job": name, "seconds": int(seconds), **data}))
EOF
  rm -f "$tmp"
}

SELECTED=("$@")
job train-a-128 240 120 bench/train_throughput.py --model ddpm-cifar10 --batch_size 128 --mixed_precision bf16 \
  --steps 20 --repeats 7 --warmup 10 --ablate
job sample-ddpm 240 150 bench/sample_throughput.py --model ddpm-cifar10 --scheduler ddpm --steps 1000 \
  --batch_size 256 --dtype fp16 --repeats 2
job sample-ddim 90 40 bench/sample_throughput.py --model ddpm-cifar10 --scheduler ddim --steps 50 \
  --batch_size 256 --dtype fp16 --repeats 5
job sample-dpm 90 40 bench/sample_throughput.py --model ddpm-cifar10 --scheduler dpmsolver++ --steps 20 \
  --batch_size 256 --dtype fp16 --repeats 5
job train-b-64 150 60 bench/train_throughput.py --model readme --batch_size 64 --mixed_precision bf16 \
  --steps 10 --repeats 5 --warmup 5
job train-a-512 480 300 bench/train_throughput.py --model ddpm-cifar10 --batch_size 512 --mixed_precision bf16 \
  --compile --steps 20 --repeats 5 --warmup 10 --full_run --full_steps 150
job sample-dpm-compile 150 90 bench/sample_throughput.py --model ddpm-cifar10 --scheduler dpmsolver++ \
  --steps 20 --batch_size 256 --dtype fp16 --repeats 5 --compile

"$PY" - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
rows = [json.loads(line) for line in open(f"{out}/results.jsonl")]
head = next((r for r in rows if "device" in r), {})
lines = [f"# GPU throughput: {head.get('device', '?')}", "",
         " | ".join(f"{k} {v}" for k, v in head.get("versions", {}).items()), "",
         "| job | setting | what | img/s | vs baseline | TFLOP/s | peak GiB |", "| --- | --- | --- | --- | --- | --- | --- |"]
for r in rows:
    if "loops" in r:
        setting = f"{r['model']} b{r['batch_size']} {r['mixed_precision']}" + (" compile" if r["compile"] else "")
        for name, x in r["loops"].items():
            lines.append(f"| {r['job']} | {setting} | {name} | {x['img_per_s']:.1f} | {x['vs_plain']:.3f} | "
                         f"{x['tflop_per_s']:.3g} | {x.get('peak_gpu_mem_GiB', '')} |")
        if "full_run" in r:
            f = r["full_run"]
            lines.append(f"| {r['job']} | {setting} | full train_ddpm.py run ({f['data']}, TensorBoard) | "
                         f"{f['img_per_s']:.1f} | {f['img_per_s'] / r['loops']['plain']['img_per_s']:.3f} | "
                         f"{f['img_per_s'] * r['gflop_per_image'] / 1e3:.3g} | |")
    elif "sides" in r:
        setting = f"{r['model']} {r['scheduler']} {r['steps']} steps b{r['batch_size']} {r['dtype']}"
        base = r["sides"]["pipeline"]["img_per_s"]
        for name, x in r["sides"].items():
            lines.append(f"| {r['job']} | {setting} | {name} ({x['ms_per_step']:.2f} ms/step) | "
                         f"{x['img_per_s']:.2f} | {x['img_per_s'] / base:.3f} | {x['tflop_per_s']:.3g} | "
                         f"{x.get('peak_gpu_mem_GiB', '')} |")
    else:
        lines.append(f"| {r['job']} | | {r.get('skipped') or r.get('failed')} | | | | |")
open(f"{out}/results.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
if (( ${#SKIPPED[@]} )); then echo "skipped for time: bash bench/run_gpu.sh ${SKIPPED[*]}"; fi
sleep 1  # let tee flush log.txt
