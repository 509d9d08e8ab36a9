#!/bin/bash
# EMR bootstrap action, run on every node before the applications start: installs the packed
# ImageIQ environment (`make pack PACK_PYTHON_PREFIX=/usr`) at /opt/imageiq/env, the Spark GPU
# discovery script at /opt/imageiq/get_gpus_resources.sh, and on GPU nodes the cgroup v1 devices
# hierarchy that YARN's GPU isolation needs on Amazon Linux 2023 (cgroup v2 by default).
set -euo pipefail

ENV_URI="${1:?usage: bootstrap.sh S3_URI_OF_imageiq-env.tar.gz S3_URI_OF_get_gpus_resources.sh}"
GPU_SCRIPT_URI="${2:?usage: bootstrap.sh S3_URI_OF_imageiq-env.tar.gz S3_URI_OF_get_gpus_resources.sh}"
PREFIX=/opt/imageiq

# The packed venv links bin/python to /usr/bin/python3.11; EMR 7 ships it, install it if missing.
if ! command -v /usr/bin/python3.11 >/dev/null; then
  sudo dnf install -y python3.11
fi

sudo mkdir -p "$PREFIX/env"
aws s3 cp --only-show-errors "$ENV_URI" /tmp/imageiq-env.tar.gz
sudo tar -xzf /tmp/imageiq-env.tar.gz -C "$PREFIX/env"
rm -f /tmp/imageiq-env.tar.gz

sudo aws s3 cp --only-show-errors "$GPU_SCRIPT_URI" "$PREFIX/get_gpus_resources.sh"
sudo chmod 755 "$PREFIX/get_gpus_resources.sh"

if command -v nvidia-smi >/dev/null; then
  sudo mkdir -p /spark-rapids-cgroup/devices
  if ! mountpoint -q /spark-rapids-cgroup/devices; then
    sudo mount -t cgroup -o devices cgroupv1-devices /spark-rapids-cgroup/devices
  fi
  sudo chmod a+rwx -R /spark-rapids-cgroup
fi

# Fail the bootstrap (and the node) now rather than every task later.
"$PREFIX/env/bin/python" -c "import imageiq_spark, tensorflow, cv2, mlflow, petastorm"
