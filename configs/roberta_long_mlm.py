"""RoBERTa-Long: convert roberta-base to 4096 tokens, then continue masked-LM pre-training.

    python -m longflax.train --config configs/roberta_long_mlm.py --workdir runs/roberta-long-mlm

Small variant (a random tiny model on local text, a few minutes on a CPU):

    python -m longflax.train --config configs/roberta_long_mlm.py:small \
        --workdir runs/roberta-long-mlm-small

Original hyperparameters: window 512 (256 tokens on each side) and positions copied from 512
to 4096. AdamW with learning rate 3e-5, betas (0.9, 0.999), eps 1e-6 and weight decay 0.01,
500 warm-up steps, then linear decay. 6000 updates of 64 sequences of 4096 tokens from
WikiText-103 (raw), in mixed precision (bfloat16 here). The global batch of 64 is built by
gradient accumulation, one sequence per micro-batch as in the original single-GPU run. With
more memory or several chips, raise the micro-batch: for example
`--config.mlm.num_microbatches=8` on an 8-chip TPU VM puts one sequence on each chip.

WikiText-103 comes from the Hugging Face hub (`pip install 'longflax[data]'`). The QA configs
read the trained model from `runs/roberta-long-mlm/mlm/model`.
"""

from longflax.configuration import long_mlm_config


def get_config(argument: str = ""):
    return long_mlm_config("roberta-base", argument, config_name="configs/roberta_long_mlm.py")
