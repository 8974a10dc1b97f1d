#!/usr/bin/env bash
# Run one QA config with seeds 0..4 and report EM and F1 as mean and sample std over the seeds.
#
#   CONFIG=configs/qa_squad.py:xlmr,512 WORKDIR=runs/qa-squad-xlmr-512 bash launch/seeds.sh
#   CONFIG=configs/qa_squad.py:xlmr-long,4096 WORKDIR=runs/qa-squad-xlmr-long-4096 \
#       bash launch/seeds.sh --config.qa.init_from=runs/xlmr-long-mlm/mlm/model
#
# Each seed runs in WORKDIR/seed-N; a finished seed is skipped, an unfinished one resumes.
# Extra arguments go to every `python -m longflax.train` call. SET names the evaluation set
# to aggregate (default squad-dev) and DATA its gold file (default SQuAD v1.1 dev in
# $LONGFLAX_DATA_DIR). For a concatenated set such as sq3-dev, DATA must be the built set
# (python -m longflax.data.concat). RULES=mlqa with LANGUAGE=de scores an MLQA set. The
# summary is also written to WORKDIR/SET-seeds.json.
set -euo pipefail

CONFIG="${CONFIG:?set CONFIG to a QA config, for example configs/qa_squad.py:xlmr,512}"
WORKDIR="${WORKDIR:?set WORKDIR to the parent directory of the seed runs}"
PYTHON="${PYTHON:-python}"
SEEDS="${SEEDS:-0 1 2 3 4}"
SET="${SET:-squad-dev}"
DATA="${DATA:-${LONGFLAX_DATA_DIR:?set LONGFLAX_DATA_DIR or DATA}/squad/dev-v1.1.json.gz}"
RULES="${RULES:-squad}"
LANGUAGE="${LANGUAGE:-}"

predictions=()
for seed in ${SEEDS}; do
  "${PYTHON}" -m longflax.train --config "${CONFIG}" --workdir "${WORKDIR}/seed-${seed}" \
    --config.seed="${seed}" "$@"
  predictions+=(--predictions "${WORKDIR}/seed-${seed}/evaluate/${SET}/predictions.json")
done

scoring=(--data "${DATA}" --rules "${RULES}")
if [[ -n "${LANGUAGE}" ]]; then
  scoring+=(--language "${LANGUAGE}")
fi
"${PYTHON}" -m longflax.evaluate "${scoring[@]}" "${predictions[@]}" | tee "${WORKDIR}/${SET}-seeds.json"
