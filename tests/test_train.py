"""The entry point: the whole chain on a tiny model, resuming, and configuration errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from longflax import train
from longflax.configuration import validate_config


def _tiny_config():
    sys.path.insert(0, "configs")
    try:
        import tiny
    finally:
        sys.path.pop(0)
    config = tiny.get_config()
    config.mlm.steps = 4
    config.mlm.warmup_steps = 1
    config.mlm.eval_batches = 1
    config.qa.steps = 4
    config.qa.train_limit = 16
    config.checkpoint.every = 2
    for entry in config.evaluate.sets:
        entry["limit"] = 6
    config.export.verify_examples = 4
    # The test session has 8 CPU devices: a 2 x 4 mesh also exercises tensor sharding.
    config.mesh.data = 2
    config.mesh.tensor = 4
    return config


@pytest.mark.slow
@pytest.mark.torch
def test_whole_chain_then_resume(data_dir, tmp_path, capsys):
    summaries = train.run(_tiny_config(), tmp_path)

    assert list(summaries) == ["convert", "mlm", "qa", "evaluate", "export"]
    for stage in summaries:
        assert (tmp_path / stage / "done.json").exists(), stage
    results = json.loads((tmp_path / "evaluate" / "results.json").read_text())
    assert set(results) == {"squad-dev", "xquad-de", "mlqa-de"}
    assert results["squad-dev"]["examples"] == 6
    assert json.loads((tmp_path / "evaluate" / "squad-dev" / "predictions.json").read_text())
    mlm = summaries["mlm"]
    assert mlm["eval_after"]["loss"] < mlm["eval_before"]["loss"]
    check = summaries["export"]["verification"]
    assert check["missing_keys"] == [] and check["unexpected_keys"] == []
    assert check["same_answers"] == check["questions"]
    assert check["max_abs_logit_difference"] < 1e-4
    assert (tmp_path / "export" / "hf" / "model.safetensors").exists()
    assert (tmp_path / "mlm" / "tensorboard").is_dir()
    assert (tmp_path / "qa" / "metrics.jsonl").read_text().count("train/loss") >= 2

    capsys.readouterr()
    train.run(_tiny_config(), tmp_path)
    printed = capsys.readouterr().out
    for stage in summaries:
        assert f"[{stage}] already done, skipping" in printed
    assert "warning" not in printed

    changed = _tiny_config()
    changed.mlm.steps = 6
    train.run(changed, tmp_path)
    printed = capsys.readouterr().out
    assert "[mlm] warning: the finished stage ran with other settings (mlm.steps); they are not applied." in printed
    assert "[qa] warning" not in printed


def test_stage_without_starting_model_is_rejected(data_dir, tmp_path):
    config = _tiny_config()
    config.stages = ("qa",)
    with pytest.raises(ValueError, match=r"Stage 'qa' has no starting model: run an earlier stage"):
        train.run(config, tmp_path)


def test_resume_from_and_init_from_together_rejected():
    config = _tiny_config()
    config.qa.init_from = "runs/x/mlm/model"
    config.qa.resume_from = "runs/y/qa/checkpoints"
    with pytest.raises(ValueError, match="qa.resume_from and qa.init_from are both set"):
        validate_config(config)


def test_batch_not_divisible_by_mesh_rejected(data_dir, tmp_path):
    config = _tiny_config()
    config.stages = ("convert", "mlm")
    config.mesh.data, config.mesh.tensor = -1, 1
    with pytest.raises(ValueError, match=r"micro-batches of 2 rows, which cannot be split over the 8 data-parallel"):
        train.run(config, tmp_path)


def test_misspelt_override_is_an_error(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "longflax.train",
            "--config",
            "configs/tiny.py",
            "--workdir",
            str(tmp_path),
            "--config.mlm.stepz=3",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "error: invalid --config or override (AttributeError): unknown config key 'stepz'" in result.stderr
    assert 'Did you mean "steps"' in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("attention", ["longformer", "full"])
def test_feature_ids_outside_vocabulary_rejected(attention):
    import numpy as np

    from longflax import stages
    from longflax.modeling import ModelConfig

    config = ModelConfig(
        vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, mlp_dim=48, max_position_embeddings=66,
        attention=attention, attention_window=8, max_global_tokens=4,
    )
    arrays = {name: np.zeros((3, 16), np.int32) for name in ("input_ids", "attention_mask", "global_attention_mask", "token_type_ids")}
    arrays["attention_mask"][:] = 1
    # The bad id sits in the last row: a check of the first row alone would miss it.
    arrays["input_ids"][2, 5] = 70
    with pytest.raises(ValueError, match=r"input_ids contain 70, outside the vocabulary \[0, 64\)"):
        stages._check_global_budget(config, arrays)


def test_missing_init_from_names_the_field(data_dir, tmp_path):
    config = _tiny_config()
    config.stages = ("qa",)
    config.qa.init_from = str(tmp_path / "runs" / "xlmr-long-mlm" / "mlm" / "model")
    with pytest.raises(ValueError, match=r"qa.init_from='.*/mlm/model' could not be loaded: .* run that config first, or pass --config.qa.init_from=DIR"):
        train.run(config, tmp_path / "run")
