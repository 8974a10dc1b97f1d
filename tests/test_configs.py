"""Tests of the experiment configs in configs/, their small variants and `validate_config`."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from longflax.configuration import base_config, small_variant, validate_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

QA_ARGUMENTS = (
    "roberta,512",
    "xlmr,512",
    "roberta-long,512",
    "roberta-long,4096",
    "xlmr-long,512",
    "xlmr-long,4096",
)
# Every argument combination of the experiment configs, without the small flag.
EXPERIMENTS = [
    ("roberta_long_mlm.py", ""),
    ("xlmr_long_mlm.py", ""),
    *[("qa_squad.py", argument) for argument in QA_ARGUMENTS],
    *[("qa_sq3.py", argument) for argument in QA_ARGUMENTS],
    ("eval_xquad.py", ""),
    ("eval_xquad.py", "4096"),
    ("eval_mlqa.py", ""),
    ("eval_mlqa.py", "4096"),
    ("eval_mlqa.py", "test"),
    ("eval_mlqa.py", "4096,test"),
]


def _spec(name: str, argument: str) -> str:
    return f"{CONFIGS / name}:{argument}" if argument else str(CONFIGS / name)


def _small(argument: str) -> str:
    return f"{argument},small" if argument else "small"


def load_with_flags(spec: str, *overrides: str):
    """Load a config file the way `longflax.train` does: a locked config flag plus overrides."""
    argv = ["train", f"--config={spec}", *overrides]
    flag_values = flags.FlagValues()
    # The override flags are defined from `sys_argv` (default: the process's sys.argv).
    config_flags.DEFINE_config_file(
        "config", None, "config file", flag_values=flag_values, lock_config=True, sys_argv=argv
    )
    flag_values(argv)
    return flag_values.config


def load_module(name: str):
    path = CONFIGS / name
    spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _data_paths(config) -> list[str]:
    paths = [config.tokenizer + "/vocab.json", config.qa.train_file]
    if "mlm" in config.stages:
        paths += list(config.mlm.train_files) + list(config.mlm.eval_files)
    if "evaluate" in config.stages:
        paths += [entry["file"] for entry in config.evaluate.sets]
    return paths


# ----------------------------------------------------------------------------------------------
# Loading every config


@pytest.mark.parametrize("name,argument", EXPERIMENTS)
def test_experiment_config_loads_and_validates(name, argument):
    config = load_with_flags(_spec(name, argument))

    validate_config(config)
    assert config.convert.source != "scratch"
    assert config.model.dtype == "bfloat16"
    for stage in ("mlm", "qa"):
        assert config[stage].learning_rate == 3e-5
        assert config[stage].eps == 1e-6
        assert (config[stage].b1, config[stage].b2) == (0.9, 0.999)
        assert config[stage].weight_decay == 0.01


@pytest.mark.parametrize("name,argument", EXPERIMENTS)
def test_small_variant_loads_and_validates(name, argument):
    config = load_with_flags(_spec(name, _small(argument)))

    validate_config(config)
    assert config.stages[0] == "convert"
    assert config.convert.source == "scratch"
    assert config.tokenizer == "data:tokenizers/roberta-base"
    assert config.scratch.num_layers == 2
    assert config.convert.max_length in (0, 1024)
    assert config.mlm.steps <= 50
    assert config.qa.steps <= 50
    assert config.qa.train_file == "data:squad/train-v1.1-first44articles.json"
    for stage in ("mlm", "qa", "evaluate", "export"):
        assert config[stage].init_from == ""
    for entry in config.evaluate.sets:
        assert 0 < entry["limit"] <= 16


@pytest.mark.parametrize("name,argument", EXPERIMENTS)
def test_small_variant_data_is_local(name, argument, data_dir, monkeypatch):
    from longflax.data.squad import resolve_data_file

    monkeypatch.setenv("LONGFLAX_DATA_DIR", str(data_dir))
    monkeypatch.setenv("LONGFLAX_OFFLINE", "1")
    monkeypatch.setenv("LONGFLAX_CACHE_DIR", "/nonexistent-longflax-cache")
    config = load_with_flags(_spec(name, _small(argument)))

    for path in _data_paths(config):
        assert path.startswith("data:"), path
        assert resolve_data_file(path[len("data:") :]).is_file(), path


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.py")), ids=lambda path: path.name)
def test_every_config_file_loads_with_defaults(path):
    config = load_with_flags(str(path))

    validate_config(config)


def test_every_experiment_config_is_tested():
    tested = {name for name, _ in EXPERIMENTS}
    present = {path.name for path in CONFIGS.glob("*.py")} - {"tiny.py", "demo.py"}

    assert present == tested


@pytest.mark.parametrize("name", sorted({name for name, _ in EXPERIMENTS}))
def test_docstring_has_small_variant_command(name):
    docstring = load_module(name).__doc__

    assert f"python -m longflax.train --config configs/{name}" in docstring
    assert "small" in docstring.split("Small variant")[1]


# ----------------------------------------------------------------------------------------------
# What the configs set


def test_mlm_config_original_recipe():
    config = load_with_flags(_spec("xlmr_long_mlm.py", ""))

    assert config.stages == ("convert", "mlm")
    assert config.convert.source == "xlm-roberta-base"
    assert config.convert.max_length == 4096
    assert config.convert.attention_window == 512
    assert config.mlm.batch_size == 64
    assert config.mlm.batch_size % config.mlm.num_microbatches == 0
    assert config.mlm.warmup_steps == 500
    assert config.mlm.steps == 6000
    assert config.mlm.train_files == ("hf:wikitext:wikitext-103-raw-v1:train",)


def test_roberta_mlm_config_source():
    config = load_with_flags(_spec("roberta_long_mlm.py", ""))

    assert config.convert.source == "roberta-base"


@pytest.mark.parametrize(
    "argument,microbatches,remat",
    [("roberta,512", 1, "none"), ("xlmr,512", 8, "none"), ("xlmr-long,4096", 32, "full")],
)
def test_qa_batch_layout(argument, microbatches, remat):
    config = load_with_flags(_spec("qa_squad.py", argument))

    assert config.qa.batch_size == 32
    assert config.qa.num_microbatches == microbatches
    assert config.model.remat == remat
    assert config.qa.epochs == 3.0
    assert config.qa.doc_stride == 0


def test_qa_starting_models():
    base = load_with_flags(_spec("qa_squad.py", "xlmr,512"))
    long = load_with_flags(_spec("qa_squad.py", "xlmr-long,4096"))
    moved = load_with_flags(
        _spec("qa_squad.py", "xlmr-long,4096"), "--config.qa.init_from=/models/mine"
    )

    assert base.stages == ("qa", "evaluate")
    assert base.qa.init_from == "xlm-roberta-base"
    assert long.qa.init_from == "runs/xlmr-long-mlm/mlm/model"
    assert moved.qa.init_from == "/models/mine"


def test_qa_default_argument():
    default = load_with_flags(_spec("qa_squad.py", ""))

    assert default.qa.max_length == 4096
    assert default.qa.init_from == "runs/xlmr-long-mlm/mlm/model"


def test_sq3_uses_original_construction():
    long = load_with_flags(_spec("qa_sq3.py", "xlmr-long,4096"))
    short = load_with_flags(_spec("qa_sq3.py", "xlmr,512"))

    assert (long.qa.concat.k, long.qa.concat.mode) == (3, "original")
    assert long.evaluate.sets[0]["concat"] == {"k": 3, "mode": "original"}
    assert long.qa.doc_stride == 0
    assert short.qa.doc_stride == 128
    assert short.evaluate.doc_stride == 128


def test_sq3_small_variant_keeps_construction():
    config = load_with_flags(_spec("qa_sq3.py", "xlmr-long,4096,small"))

    assert config.qa.concat.k == 3
    assert config.evaluate.sets[0]["concat"] == {"k": 3, "mode": "original"}


def test_xquad_sets():
    config = load_with_flags(_spec("eval_xquad.py", "4096"))
    names = [entry["name"] for entry in config.evaluate.sets]

    assert config.stages == ("evaluate",)
    assert config.evaluate.max_length == 4096
    assert len(names) == 22
    assert "xquad-th" in names
    assert "xq3-zh" in names
    for entry in config.evaluate.sets:
        assert entry["rules"] == "squad"
        assert entry["file"] == f"data:xquad/xquad.{entry['language']}.json"
        if entry["name"].startswith("xq3-"):
            assert entry["concat"] == {"k": 3, "mode": "original"}


def test_xquad_small_variant_trains_a_qa_model():
    config = load_with_flags(_spec("eval_xquad.py", "small"))

    assert config.stages == ("convert", "qa", "evaluate")
    assert config.evaluate.init_from == ""


def test_mlqa_sets():
    dev = load_with_flags(_spec("eval_mlqa.py", ""))
    test = load_with_flags(_spec("eval_mlqa.py", "test"))
    small = load_with_flags(_spec("eval_mlqa.py", "test,small"))
    dev_files = {entry["language"]: entry["file"] for entry in dev.evaluate.sets}

    assert sorted(dev_files) == ["ar", "de", "en", "es", "hi", "vi", "zh"]
    assert dev_files["de"] == "data:mlqa/dev-context-de-question-de.from-hf-arrow.json"
    assert dev_files["zh"] == "data:mlqa/dev-context-zh-question-zh.json"
    assert all(entry["rules"] == "mlqa" for entry in dev.evaluate.sets)
    assert test.evaluate.sets[1]["file"] == "data:mlqa/test-context-de-question-de.json"
    assert [entry["language"] for entry in small.evaluate.sets] == ["de"]


def test_evaluate_override_from_command_line():
    config = load_with_flags(
        _spec("eval_xquad.py", ""),
        "--config.evaluate.init_from=runs/qa/qa/model",
        "--config.evaluate.doc_stride=128",
    )

    assert config.evaluate.init_from == "runs/qa/qa/model"
    assert config.evaluate.doc_stride == 128


# ----------------------------------------------------------------------------------------------
# small_variant on its own


def test_small_variant_of_evaluation_only_config():
    config = base_config()
    config.stages = ("evaluate",)
    config.evaluate.init_from = "runs/qa/qa/model"

    small_variant(config)

    assert config.stages == ("convert", "qa", "evaluate")
    assert config.evaluate.init_from == ""


def test_small_variant_keeps_full_attention_models_short():
    config = base_config()
    config.stages = ("qa", "evaluate")
    config.convert.max_length = 0
    config.qa.max_length = 512

    small_variant(config)

    assert config.convert.max_length == 0
    assert config.qa.max_length == 512
    assert config.scratch.max_position_embeddings == 514


def test_small_variant_shrinks_long_models():
    config = base_config()
    config.qa.max_length = 4096
    config.evaluate.max_length = 4096

    small_variant(config)

    assert config.convert.max_length == 1024
    assert config.convert.attention_window == 64
    assert config.qa.max_length == 1024
    assert config.evaluate.max_length == 1024
    assert config.qa.max_question_tokens < config.convert.max_global_tokens


def test_small_variant_keeps_accumulation():
    config = base_config()
    config.mlm.num_microbatches = 64
    config.qa.num_microbatches = 1

    small_variant(config)

    assert config.mlm.num_microbatches == 2
    assert config.qa.num_microbatches == 1
    validate_config(config)


def test_small_variant_clears_resume_paths():
    config = base_config()
    config.qa.resume_from = "runs/old/qa/checkpoints"

    small_variant(config)

    assert config.qa.resume_from == ""


# ----------------------------------------------------------------------------------------------
# Config argument errors


@pytest.mark.parametrize(
    "argument,message",
    [
        ("xlmr", r"expected MODEL,LENGTH\[,small\]"),
        ("xlmr,512,4096", r"expected MODEL,LENGTH\[,small\]"),
        ("bert,512", r"Unknown model 'bert'.*Use one of \['roberta'"),
        ("xlmr,1024", r"Unknown length '1024'.*Use one of \[512, 4096\]"),
        ("xlmr,4096", r"'xlmr' reads at most 512 tokens, so length 4096 is invalid; use xlmr-long"),
    ],
)
@pytest.mark.parametrize("name", ["qa_squad.py", "qa_sq3.py"])
def test_qa_config_rejects_bad_argument(name, argument, message):
    with pytest.raises(ValueError, match=message):
        load_module(name).get_config(argument)


@pytest.mark.parametrize(
    "name,argument,message",
    [
        (
            "roberta_long_mlm.py",
            "tiny",
            r"Unknown config argument \['tiny'\].*only option is 'small'",
        ),
        ("xlmr_long_mlm.py", "4096", r"Unknown config argument \['4096'\].*only option is 'small'"),
        (
            "eval_xquad.py",
            "2048",
            r"expected \[LENGTH\]\[,small\] with LENGTH one of \[512, 4096\]",
        ),
        ("eval_xquad.py", "512,4096", r"expected \[LENGTH\]\[,small\]"),
        ("eval_mlqa.py", "train", r"expected \[LENGTH\]\[,test\]\[,small\]"),
    ],
)
def test_config_rejects_bad_argument(name, argument, message):
    with pytest.raises(ValueError, match=message):
        load_module(name).get_config(argument)


# ----------------------------------------------------------------------------------------------
# Overrides and validate_config messages


def test_misspelt_override_key_raises_in_process():
    with pytest.raises(AttributeError, match=r"stepz.*Did you mean \"steps\""):
        load_with_flags(str(CONFIGS / "tiny.py"), "--config.mlm.stepz=3")


def test_misspelt_override_key_fails_train_command(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "longflax.train",
            "--config",
            str(CONFIGS / "tiny.py"),
            "--workdir",
            str(tmp_path / "run"),
            "--config.mlm.stepz=3",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode != 0
    assert "stepz" in result.stderr
    assert not (tmp_path / "run").exists()


def _valid() -> object:
    return base_config()


def _set(config, path: str, value) -> None:
    *parents, leaf = path.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = value


@pytest.mark.parametrize(
    "changes,message",
    [
        (
            {"stages": ("convert", "train")},
            r"stages contains \['train'\]; the stages are \['convert'",
        ),
        (
            {"stages": ("qa", "mlm")},
            r"stages=\['qa', 'mlm'\] must be in the order .* each at most once",
        ),
        ({"stages": ("qa", "qa")}, r"must be in the order .* each at most once"),
        (
            {"mlm.resume_from": "runs/a/mlm/checkpoints", "mlm.init_from": "runs/b/mlm/model"},
            r"mlm.resume_from and mlm.init_from are both set; give only one",
        ),
        (
            {"qa.resume_from": "runs/a/qa/checkpoints", "qa.init_from": "xlm-roberta-base"},
            r"qa.resume_from and qa.init_from are both set",
        ),
        (
            {"qa.batch_size": 32, "qa.num_microbatches": 5},
            r"qa.batch_size=32 must be a positive multiple of qa.num_microbatches=5",
        ),
        ({"mlm.batch_size": 0}, r"mlm.batch_size=0 must be a positive multiple"),
        ({"mlm.num_microbatches": 0}, r"mlm.num_microbatches=0"),
        ({"qa.learning_rate": 0.0}, r"qa.learning_rate=0.0 must be positive"),
        ({"mlm.steps": 0}, r"mlm.steps=0 must be at least 1"),
        ({"mlm.mask_probability": 1.0}, r"mlm.mask_probability=1.0 must be in \(0, 1\)"),
        ({"qa.doc_stride": -1}, r"qa.doc_stride=-1 must be >= 0"),
        ({"qa.epochs": 0.0, "qa.steps": 0}, r"qa.epochs and qa.steps are both 0; set one of them"),
        ({"convert.attention_window": 511}, r"convert.attention_window=511 must be even"),
        ({"model.dtype": "float16"}, r"model.dtype='float16' must be 'float32' or 'bfloat16'"),
        ({"model.remat": "some"}, r"model.remat='some' must be 'none', 'full' or 'dots'"),
        ({"mesh.data": 0}, r"mesh=.*sizes must be positive, with at most one -1"),
        ({"mesh.fsdp": -1}, r"mesh=.*at most one -1"),
        ({"evaluate.sets": [{"name": "x"}]}, r"evaluate.sets entry .* lacks \['file'\]"),
        (
            {"evaluate.sets": [{"name": "x", "file": "a.json", "rules": "tydi"}]},
            r"evaluate.sets x: rules='tydi' must be 'squad' or 'mlqa'",
        ),
        (
            {"evaluate.sets": [{"name": "mlqa-x", "file": "a.json", "rules": "mlqa"}]},
            r"evaluate.sets mlqa-x: the mlqa rules need a language",
        ),
    ],
)
def test_validate_config_rejects(changes, message):
    config = _valid()
    for path, value in changes.items():
        _set(config, path, value)

    with pytest.raises(ValueError, match=message):
        validate_config(config)


def test_validate_config_allows_odd_window_without_conversion():
    config = base_config()
    config.convert.max_length = 0
    config.convert.attention_window = 511

    validate_config(config)


def test_validate_config_skips_steps_of_absent_stages():
    config = base_config()
    config.stages = ("evaluate",)
    config.mlm.steps = 0
    config.qa.epochs = 0.0
    config.qa.steps = 0

    validate_config(config)


# ----------------------------------------------------------------------------------------------
# One small variant end to end


@pytest.mark.slow
def test_small_mlm_variant_runs(tmp_path, data_dir):
    workdir = tmp_path / "run"
    env = {**os.environ, "LONGFLAX_DATA_DIR": str(data_dir), "LONGFLAX_OFFLINE": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "longflax.train",
            "--config",
            f"{CONFIGS / 'xlmr_long_mlm.py'}:small",
            "--workdir",
            str(workdir),
            "--config.mlm.steps=3",
            "--config.mlm.eval_every=0",
            "--config.mlm.eval_batches=1",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((workdir / "mlm" / "done.json").read_text())
    assert summary["steps"] == 3
    assert summary["eval_after"]["num_tokens"] > 0
    assert (workdir / "mlm" / "model").is_dir()
    converted = json.loads((workdir / "convert" / "done.json").read_text())
    assert converted["new_max_length"] == 1024


# ----------------------------------------------------------------------------------------------
# Launch scripts


@pytest.mark.parametrize("name", ["tpu_vm.sh", "gpu_vm.sh", "seeds.sh"])
def test_launch_script_parses(name):
    script = ROOT / "launch" / name

    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)

    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", ["tpu_vm.sh", "gpu_vm.sh", "seeds.sh"])
def test_launch_script_passes_shellcheck(name):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")

    result = subprocess.run(
        ["shellcheck", str(ROOT / "launch" / name)], capture_output=True, text=True
    )

    assert result.returncode == 0, result.stdout


def test_seeds_script_reads_evaluate_predictions():
    # The evaluate stage writes DIR/evaluate/<set>/predictions.json; the script must read it.
    text = (ROOT / "launch" / "seeds.sh").read_text()

    assert "evaluate/${SET}/predictions.json" in text
    assert "--config.seed=" in text
