"""Tests of the input-pipeline benchmark on a slice of real SQuAD data."""

from __future__ import annotations

import json

from longflax import pipeline_bench


def test_reports_every_step_on_real_squad(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LONGFLAX_DATA_DIR", str(data_dir))
    out = tmp_path / "pipeline.json"
    code = pipeline_bench.main([
        "--data", "data:squad/dev-v1.1.json", "--limit", "40", "--max-length", "256",
        "--doc-stride", "64", "--batch-size", "8", "--json", str(out),
    ])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["questions"] == 40
    assert report["features"] >= 40
    assert set(report["steps"]) == {
        "read and validate", "load tokenizer", "tokenise and build features",
        "convert to int32 arrays", "assemble batches",
    }
    assert report["batches_assembled"] == report["features"] // 8
    assert report["command"].startswith("python -m longflax.pipeline_bench --data")
    assert "questions ->" in capsys.readouterr().out


def test_rejects_non_positive_batch_size(data_dir, capsys, monkeypatch):
    monkeypatch.setenv("LONGFLAX_DATA_DIR", str(data_dir))
    code = pipeline_bench.main(["--data", "data:squad/dev-v1.1.json", "--limit", "5", "--batch-size", "0"])
    assert code == 2
    assert "--batch-size must be a positive number of rows, got 0" in capsys.readouterr().err


def test_missing_file_is_a_clear_error(tmp_path, capsys):
    code = pipeline_bench.main(["--data", str(tmp_path / "absent.json"), "--tokenizer", str(tmp_path)])
    assert code == 2
    assert "absent.json" in capsys.readouterr().err


def test_rows_pad_to_longest_not_max_length(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LONGFLAX_DATA_DIR", str(data_dir))
    out = tmp_path / "pipeline.json"
    code = pipeline_bench.main([
        "--data", "data:squad/dev-v1.1.json", "--limit", "20", "--max-length", "4096",
        "--doc-stride", "0", "--batch-size", "4", "--json", str(out),
    ])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["row_length"] < 4096
    assert report["row_length"] % 128 == 0
    assert report["row_length"] >= report["mean_tokens_per_feature"]


def test_json_into_new_folder_is_written(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LONGFLAX_DATA_DIR", str(data_dir))
    out = tmp_path / "new" / "folder" / "pipeline.json"
    assert pipeline_bench.main(["--data", "data:squad/dev-v1.1.json", "--limit", "5", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["questions"] == 5


def test_missing_tokenizer_directory_named(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LONGFLAX_DATA_DIR", str(data_dir))
    missing = tmp_path / "no-tokenizer"
    code = pipeline_bench.main(["--data", "data:squad/dev-v1.1.json", "--limit", "5", "--tokenizer", str(missing)])
    assert code == 2
    assert f"Tokenizer directory {missing} not found" in capsys.readouterr().err
