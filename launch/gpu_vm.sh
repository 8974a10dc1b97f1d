#!/usr/bin/env bash
# Set up longflax on a fresh single-GPU VM (NVIDIA driver installed) and run one config.
#
#   CONFIG=configs/qa_squad.py:xlmr-long,4096 WORKDIR=runs/qa-squad-xlmr-long-4096 \
#       bash launch/gpu_vm.sh --config.qa.init_from=runs/xlmr-long-mlm/mlm/model
#
# Run it from the repository root. Extra arguments go to `python -m longflax.train`. The venv
# is created once in $VENV and reused. JAX_EXTRA=cuda13 selects the CUDA 13 wheels, and
# WITH_TORCH=1 also installs the CPU build of torch 2.13.0 for PyTorch parity checks of
# exported models.
set -euo pipefail

CONFIG="${CONFIG:?set CONFIG to a config file, for example configs/qa_squad.py:xlmr,512}"
WORKDIR="${WORKDIR:?set WORKDIR to the run directory, for example runs/qa-squad-xlmr-512}"
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
JAX_EXTRA="${JAX_EXTRA:-cuda12}"
WITH_TORCH="${WITH_TORCH:-0}"

if [[ ! -x "${VENV}/bin/python" ]]; then
  "${PYTHON}" -m venv "${VENV}"
  "${VENV}/bin/pip" install --upgrade pip
  "${VENV}/bin/pip" install -e '.[data]' "jax[${JAX_EXTRA}]~=0.10.2"
  if [[ "${WITH_TORCH}" == "1" ]]; then
    # An unpinned torch, or one from PyPI, pulls a CUDA build of several GB.
    "${VENV}/bin/pip" install 'torch==2.13.0' --index-url https://download.pytorch.org/whl/cpu
  fi
fi

"${VENV}/bin/python" -c 'import jax; print(jax.device_count(), "devices:", jax.devices()[0].device_kind)'
exec "${VENV}/bin/python" -m longflax.train --config "${CONFIG}" --workdir "${WORKDIR}" "$@"
