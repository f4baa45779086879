#!/usr/bin/env bash
# Sample the Qwen2.5-Coder-0.5B MBPP set on a lent GPU (the `device` tool of this workplace) in one
# continuous batch, and pack the shards for the trip back. The GGUF travels in eight parts under .m0/ ... .m7/
# (see data/mbpp-qwen2.5-coder-0.5b/PROVENANCE.md); transformers 5.23 and gguf travel as wheels in .whl/.
#   bash experiments/gpu_sample.sh OUT_DIR [BATCH] [DATASET]      DATASET: mbpp (default) or humaneval
set -euo pipefail
out=${1:?OUT_DIR}; batch=${2:-768}; dataset=${3:-mbpp}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 QPROBE_CACHE=/tmp/qcache
dst=$QPROBE_CACHE/models/qwen2.5-coder-0.5b
mkdir -p "$dst"
cat /tmp/qp/0 /tmp/qp/1 /tmp/qp/2 /tmp/qp/3 /tmp/qp/4 /tmp/qp/5 /tmp/qp/6 /tmp/qp/7 > "$dst/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
echo "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32  $dst/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf" | sha256sum -c
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 420 python3 experiments/mbpp_sample.py --model qwen2.5-coder-0.5b --dataset "$dataset" --all-at-once --device cuda --dtype bfloat16 \
    --batch-size "$batch" --threads 8 --extractors 3 --out /tmp/shards/shards --cache /tmp/qcache/run 2>&1 \
    | tr '\r' '\n' | grep -v "it/s\]\|completion/s\]" | tee "$out/log.txt" || true
tar cf - -C /tmp/shards shards | split -b 15000000 -d -a 1 - "$out/shards.tar."
ls -la "$out"
