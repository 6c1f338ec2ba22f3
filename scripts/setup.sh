#!/usr/bin/env bash
# Install gnsp and everything it needs into .venv (idempotent). System packages bring the offline
# reference data (emoji font, flags), Fashion-MNIST and OpenCV's sample photos (held-out suite); they are
# optional when not root.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
SYSTEM_PACKAGES="fonts-noto-color-emoji iso-flags-png-320x240 iso-codes dataset-fashion-mnist opencv-doc"
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  missing=$(for p in $SYSTEM_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
  if [ -n "$missing" ]; then
    echo "installing system packages: $missing"
    (apt-get install -y -q $missing >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q $missing >/dev/null; })
  fi
else
  echo "not root: skipping system packages ($SYSTEM_PACKAGES); install them for the built-in reference data"
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
# animal-mnist's declared dependencies pull TensorFlow; its data files are all gnsp reads.
.venv/bin/pip install -q --disable-pip-version-check --no-deps animal-mnist==0.4
echo "gnsp is installed in .venv"
