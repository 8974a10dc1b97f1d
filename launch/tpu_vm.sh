#!/usr/bin/env bash
# Set up longflax on a fresh single-host Cloud TPU VM and run one experiment config.
#
#   CONFIG=configs/xlmr_long_mlm.py WORKDIR=runs/xlmr-long-mlm bash launch/tpu_vm.sh \
#       --config.mlm.num_microbatches=8
#
# Run it from the repository root. Extra arguments go to `python -m longflax.train`. The venv
# is created once in $VENV and reused. Multi-host TPU slices need the command on every host
# (gcloud ... ssh --worker=all) and are not covered by this script.
set -euo pipefail

CONFIG="${CONFIG:?set CONFIG to a config file, for example configs/xlmr_long_mlm.py}"
WORKDIR="${WORKDIR:?set WORKDIR to the run directory, for example runs/xlmr-long-mlm}"
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

if [[ ! -x "${VENV}/bin/python" ]]; then
  "${PYTHON}" -m venv "${VENV}"
  "${VENV}/bin/pip" install --upgrade pip
  # The data extra reads WikiText-103 from the Hugging Face hub; torch is not needed.
  "${VENV}/bin/pip" install -e '.[data]' 'jax[tpu]~=0.10.2'
fi

"${VENV}/bin/python" -c 'import jax; print(jax.device_count(), "devices:", jax.devices()[0].device_kind)'
exec "${VENV}/bin/python" -m longflax.train --config "${CONFIG}" --workdir "${WORKDIR}" "$@"
