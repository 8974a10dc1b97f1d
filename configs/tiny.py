"""Tiny end-to-end run on CPU: a random RoBERTa-shaped model through every stage in minutes.

    python -m longflax.train --config configs/tiny.py --workdir runs/tiny

Checks the whole chain (convert -> mlm -> qa -> evaluate -> export) on real data; the scores of
a random tiny model are near zero by design.
"""

from longflax.configuration import base_config


def get_config():
    config = base_config()
    config.tokenizer = "data:tokenizers/roberta-base"
    config.log_every = 5
    config.checkpoint.every = 10
    config.convert.source = "scratch"
    config.convert.max_length = 1024
    config.convert.attention_window = 64
    config.convert.max_global_tokens = 48
    config.mlm.train_files = ("data:text/gutenberg/pg84.txt",)
    config.mlm.eval_files = ("data:text/wikitext-2/wiki.valid.tokens.gz",)
    config.mlm.layout = "paragraphs"
    config.mlm.block_length = 256
    config.mlm.batch_size = 4
    config.mlm.num_microbatches = 2
    config.mlm.steps = 20
    config.mlm.warmup_steps = 5
    config.mlm.learning_rate = 5e-4
    config.mlm.eval_batches = 4
    config.qa.train_file = "data:squad/train-v1.1-first44articles.json"
    config.qa.train_limit = 64
    config.qa.max_length = 256
    config.qa.doc_stride = 64
    config.qa.max_question_tokens = 40
    config.qa.batch_size = 8
    config.qa.steps = 16
    config.qa.learning_rate = 3e-4
    config.evaluate.sets = [
        {"name": "squad-dev", "file": "data:squad/dev-v1.1.json", "rules": "squad", "language": "en", "limit": 24, "max_length": 256, "doc_stride": 64},
        {"name": "xquad-de", "file": "data:xquad/xquad.de.json", "rules": "squad", "language": "de", "limit": 16, "max_length": 256, "doc_stride": 64},
        {"name": "mlqa-de", "file": "data:mlqa/dev-context-de-question-de.from-hf-arrow.json", "rules": "mlqa", "language": "de", "limit": 16, "max_length": 256, "doc_stride": 64},
    ]
    config.evaluate.batch_size = 8
    config.export.head = "qa"
    return config
