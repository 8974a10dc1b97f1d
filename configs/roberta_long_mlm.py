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

from longflax.configuration import base_config, small_variant


def get_config(argument: str = ""):
    options = [option for option in argument.split(",") if option]
    unknown = sorted(set(options) - {"small"})
    if unknown:
        raise ValueError(
            f"Unknown config argument {unknown} in {argument!r}. The only option is 'small', "
            "as in configs/roberta_long_mlm.py:small."
        )
    config = base_config()
    config.stages = ("convert", "mlm")
    config.model.dtype = "bfloat16"
    config.convert.source = "roberta-base"
    config.convert.head = "mlm"
    config.convert.max_length = 4096
    config.convert.attention_window = 512
    config.mlm.learning_rate = 3e-5
    config.mlm.warmup_steps = 500
    config.mlm.batch_size = 64
    config.mlm.num_microbatches = 64
    config.mlm.steps = 6000
    config.mlm.eval_every = 500
    if "small" in options:
        small_variant(config)
    return config
