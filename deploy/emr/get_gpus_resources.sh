#!/usr/bin/env bash
# Spark resource discovery script (spark.{driver,executor}.resource.gpu.discoveryScript): prints
# the GPUs of this node as Spark's ResourceInformation JSON, e.g. {"name": "gpu", "addresses": ["0", "1"]}.
# Exits non-zero when nvidia-smi is missing or fails, so Spark reports the node instead of running
# GPU tasks without a GPU.
set -euo pipefail

if ! command -v nvidia-smi >/dev/null; then
  echo "get_gpus_resources.sh: nvidia-smi not found; this node has no NVIDIA driver" >&2
  exit 1
fi
indices=$(nvidia-smi --query-gpu=index --format=csv,noheader)
addresses=$(printf '%s\n' "$indices" | tr -d '[:blank:]' | sed -e '/^$/d' -e 's/.*/"&"/' | paste -sd, -)
echo "{\"name\": \"gpu\", \"addresses\": [${addresses}]}"
