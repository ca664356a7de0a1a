# The few commands a person types. `just demo` and `just test` set everything up first.
set shell := ["bash", "-euo", "pipefail", "-c"]

# GPU users: `just torch="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" setup`
torch := env_var_or_default("SDO_TORCH", "torch==2.13.0")
venv := ".venv"
py := venv / "bin/python"
sdo := venv / "bin/sdo"
stamp := venv / ".sdo-installed"

# Create .venv if absent, install torch, then this package (+ dev tools, ONNX export) with its native ops.
setup:
    #!/usr/bin/env bash
    set -euo pipefail
    [ -x {{py}} ] || python3 -m venv {{venv}}
    if [ -f {{stamp}} ] && [ -z "$(find setup.py constraints.txt csrc -newer {{stamp}} -print -quit)" ]; then exit 0; fi
    {{py}} -m pip install -q --upgrade pip setuptools wheel
    {{py}} -c "import torch" 2>/dev/null || {{py}} -m pip install -q {{torch}}
    {{py}} -m pip install -q -c constraints.txt --no-build-isolation -e ".[dev,export]"
    touch {{stamp}}

# Synthetic COCO -> WebDataset shards -> 2-worker Ray Train run -> MLflow (CPU, under 8 minutes on 2 cores).
# Extra arguments go to `sdo launch` (e.g. `just demo --name my-demo`).
demo *args: setup
    {{sdo}} data synth --out runs/demo/coco --train 320 --val 32 --size 128 --max-shapes 2 --scale 0.3 0.7 --seed 0 --overwrite
    {{sdo}} data shard --images runs/demo/coco/train --annotations runs/demo/coco/annotations/instances_train.json --out runs/demo/shards/train --shard-size 64 --overwrite
    {{sdo}} data shard --images runs/demo/coco/val --annotations runs/demo/coco/annotations/instances_val.json --out runs/demo/shards/val --shard-size 16 --overwrite
    {{sdo}} launch --config configs/demo.yaml {{args}}

# Does the demo learn? `just demo` timed (setup excluded) -> runs/demo/check.json (AP curve, wall time, load);
# fails when the final val AP50 < 0.5 or the demo took over 8 minutes. A benchmark: not part of `just test`.
demo-check: setup
    #!/usr/bin/env bash
    set -euo pipefail
    name="demo-check-$(date -u +%Y%m%dT%H%M%S)"
    started=$(date +%s.%N)
    {{just_executable()}} demo --name "$name"
    {{sdo}} bench demo --run-dir "runs/$name" --started-at "$started" --min-ap50 0.5 --max-seconds 480 --out runs/demo/check.json

# Run the test suite (CPU; CUDA tests run only where a GPU is present).
test *args: setup browser
    {{py}} -m pytest -q -ra tests {{args}}

# Chromium for the MLflow UI browser test (the system's, else apt-get as root, else playwright's); never fails.
browser: setup
    #!/usr/bin/env bash
    set -uo pipefail
    for b in chromium chromium-browser google-chrome; do command -v $b >/dev/null 2>&1 && exit 0; done
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
      export DEBIAN_FRONTEND=noninteractive
      apt-get install -y -qq chromium >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1; } && exit 0
    fi
    timeout 300 {{py}} -m playwright install chromium >/dev/null 2>&1 || echo "just: no Chromium found or installable; the browser test will skip"

# (Re)build the native deformable-attention op (JIT, cached) and say what is built.
ops: setup
    {{sdo}} ops build
    {{sdo}} ops status

# Shard a COCO folder: just shards IMAGES ANNOTATIONS OUT
shards images annotations out: setup
    {{sdo}} data shard --images {{images}} --annotations {{annotations}} --out {{out}}

# Train: just launch configs/r50_sparse_detr_rho0.1.yaml [--cluster ...] [--set k=v ...]
launch config *args: setup
    {{sdo}} launch --config {{config}} {{args}}

# Sweep: just sweep configs/sweep_demo.yaml [--cluster ...]
sweep config="configs/sweep_demo.yaml" *args="": setup
    {{sdo}} sweep --config {{config}} {{args}}

# MLflow UI on 127.0.0.1 for the embedded store.
ui: setup
    {{sdo}} ui

# Benchmarks (JSON): just bench ops|data|train|flops
bench what="ops" *args="": setup
    {{sdo}} bench {{what}} {{args}}

# Everything that needs a GPU, in a few minutes (H200: about 5): build the op for this GPU, CUDA tests, op /
# model / training benchmarks, fp32 and bf16 overfits -> runs/gpu_check/gpu_check.json and a summary table.
# `just gpu-check --cpu-dry-run` checks the harness on tiny CPU sizes; `--stages`, `--reference DIR`, `--no-build`.
gpu-check *args: setup
    {{sdo}} bench gpu-check {{args}}

# Docker image with the ops prebuilt for sm_70-sm_90 (needs a Docker engine).
image tag="sdo:latest":
    docker build -f deploy/Dockerfile -t {{tag}} .

lint: setup
    {{venv}}/bin/ruff check model pipelines orchestrator tests setup.py
