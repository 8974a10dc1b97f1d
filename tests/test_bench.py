"""Tests of the side-by-side benchmark: option checks, memory planning and one quick run."""

from __future__ import annotations

import json
import pathlib

import pytest

from longflax import bench


def settings_for(argv: list[str]) -> bench.BenchSettings:
    return bench.settings_from_args(bench.build_parser().parse_args(argv))


def test_parse_lengths_accepts_list():
    assert bench.parse_lengths("512, 1024,2048") == (512, 1024, 2048)


@pytest.mark.parametrize("text", ["512,abc", "512,-3", "0", "1.5"])
def test_parse_lengths_rejects_non_positive(text):
    with pytest.raises(ValueError, match=r"must be a comma-separated list of positive integers"):
        bench.parse_lengths(text)


def test_parse_lengths_rejects_empty():
    with pytest.raises(ValueError, match=r"--lengths=',' is empty"):
        bench.parse_lengths(",")


def test_presets_resolve_to_documented_shapes():
    small = settings_for([])
    assert (small.layers, small.hidden, small.heads, small.window) == (4, 256, 4, 512)
    assert small.lengths == (512, 1024, 2048, 4096, 8192, 16384)
    assert small.repeats >= 5

    base = settings_for(["--preset", "base"])
    assert (base.layers, base.hidden, base.heads, base.vocab_size) == (12, 768, 12, 250002)
    assert base.model_config("longformer")["max_position_embeddings"] == 4098

    quick = settings_for(["--quick"])
    assert quick.lengths == (256, 512)
    assert quick.repeats == 2


def test_explicit_options_override_preset():
    settings = settings_for(
        [
            "--preset",
            "base",
            "--layers",
            "2",
            "--hidden",
            "128",
            "--heads",
            "4",
            "--lengths",
            "1024",
        ]
    )
    assert settings.layers == 2
    assert settings.hidden == 128
    assert settings.mlp_dim == 512
    assert settings.lengths == (1024,)
    assert settings.heads == 4
    assert settings.vocab_size == 250002


def test_window_is_two_sided_width():
    settings = settings_for(["--window", "512"])
    assert settings.radius == 256
    assert settings.padded_length(4096) == 4096
    assert settings.padded_length(600) == 1024
    assert settings.model_config("longformer")["attention_window"] == (512,) * 4
    assert settings.model_config("full")["attention_window"] == ()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--layers", "0"], r"--layers=0 must be positive"),
        (["--hidden", "250", "--heads", "4"], r"--hidden=250 is not divisible by --heads=4"),
        (["--window", "511"], r"--window=511 must be even and positive"),
        (["--window", "0"], r"--window=0 must be even and positive"),
        (["--repeats", "0"], r"--repeats=0 must be at least 1"),
        (["--lengths", "256", "--global-tokens", "256"], r"--global-tokens=256 must be at least 0"),
        (["--global-tokens", "-1"], r"--global-tokens=-1 must be at least 0"),
        (["--memory-limit-gib", "0"], r"--memory-limit-gib=0.0 must be positive"),
        (["--timeout", "-5"], r"--timeout=-5.0 must be positive"),
        (["--variants", "jax"], r"names unknown variants \['jax'\]"),
        (["--variants", "pytorch"], r"includes pytorch but not longflax-long"),
        (
            ["--kernel-block-sizes", "64,x"],
            r"--kernel-block-sizes='64,x' must be a comma-separated",
        ),
    ],
)
def test_invalid_options_rejected(argv, message):
    with pytest.raises(ValueError, match=message):
        settings_for(argv)


def test_main_reports_invalid_option(capsys):
    assert bench.main(["--window", "7"]) == 2
    assert "error: --window=7 must be even and positive" in capsys.readouterr().err


def test_quick_and_preset_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--quick", "--preset", "base"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_full_attention_skipped_over_memory_limit():
    settings = settings_for([])
    # 4 layers x 4 heads x 8192^2 scores x 16 bytes = 16 GiB for training; 4 heads x 16384^2
    # scores x 12 bytes = 12 GiB for one forward layer.
    assert bench.estimate_full_attention_bytes(settings, 8192, "train") == 16 * 2**30
    assert bench.estimate_full_attention_bytes(settings, 16384, "forward") == 12 * 2**30
    skipped = bench._plan_modes(settings, "longflax-full", 16384)
    assert set(skipped) == {"train"}
    assert "exceed --memory-limit-gib=16" in skipped["train"]
    assert set(bench._plan_modes(settings, "longflax-full", 16384 - 2048)) == {"train"}
    assert bench._plan_modes(settings, "longflax-full", 4096) == {}
    assert bench._plan_modes(settings, "longflax-long", 16384) == {}
    assert bench._plan_modes(settings, "pytorch", 16384) == {}


def test_child_environment_uses_one_device(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_cpu_foo=1")
    env = bench._child_environment()
    assert env["XLA_FLAGS"] == "--xla_cpu_foo=1"
    assert str(pathlib.Path(bench.__file__).resolve().parent.parent) in env["PYTHONPATH"]


def test_baseline_failure_raises(tmp_path):
    with pytest.raises(RuntimeError, match=r"The jax baseline subprocess, which only imports"):
        bench.measure_baseline("jax", tmp_path, timeout_s=0.01)


def test_spawn_reports_worker_crash(tmp_path):
    run = bench._spawn({"worker": "no-such-worker"}, tmp_path, "crash", timeout_s=300)
    assert run["failed"].startswith("exit code 1")
    assert "KeyError" in run["failed"]


def test_prepare_timeout_raises(tmp_path):
    settings = settings_for(["--quick", "--timeout", "0.01"])
    with pytest.raises(
        RuntimeError,
        match=r"Exporting the model and timing the kernels failed \(timed out after 0.01 s",
    ):
        bench.run_benchmark(settings)


def test_ratios_and_markdown_from_results():
    ok = {"status": "ok", "compile_s": 1.0, "first_call_s": 1.0, "times_s": [1.0]}
    results = [
        dict(
            ok,
            variant="longflax-long",
            mode="train",
            length=512,
            median_s=1.0,
            tokens_per_s=512.0,
            peak_rss_mib=100.0,
        ),
        dict(
            ok,
            variant="longflax-full",
            mode="train",
            length=512,
            median_s=0.5,
            tokens_per_s=1024.0,
            peak_rss_mib=80.0,
        ),
        dict(
            ok,
            variant="pytorch",
            mode="train",
            length=512,
            median_s=3.0,
            tokens_per_s=171.0,
            peak_rss_mib=200.0,
            compile_s=None,
        ),
        {
            "variant": "longflax-full",
            "mode": "forward",
            "length": 512,
            "status": "skipped",
            "reason": "skipped: too big",
        },
    ]
    ratios = bench._ratios(results, [512])
    assert ratios == [
        {
            "length": 512,
            "mode": "train",
            "speedup_vs_pytorch": 3.0,
            "memory_vs_pytorch": 0.5,
            "long_over_full_time": 2.0,
        }
    ]
    report = {
        "settings": bench.dataclasses.asdict(settings_for(["--lengths", "512"])),
        "results": results,
        "ratios": ratios,
        "dense_matmul": None,
        "parity": {"length": 512, "max_abs_diff": 1e-6},
    }
    text = bench.render_markdown(report)
    assert "| 512 | 1 (512) | 0.5 (1024) | 3 (171) | 3 | 2 |" in text
    assert "- longflax-full forward at 512: skipped: too big" in text
    assert "1.00e-06" in text


@pytest.mark.slow
@pytest.mark.torch
def test_quick_run_writes_report(tmp_path, capsys):
    json_path, markdown_path = tmp_path / "bench.json", tmp_path / "bench.md"
    assert bench.main(["--quick", "--json", str(json_path), "--markdown", str(markdown_path)]) == 0
    report = json.loads(json_path.read_text())

    assert report["command"].startswith("python -m longflax.bench --quick")
    for field in ("cpu_model", "cores", "load_average_at_start", "load_average_at_end"):
        assert field in report["machine"]
    for package in ("jax", "flax", "torch", "transformers"):
        assert report["versions"][package] != "not installed"
    assert report["code_version"]
    assert report["baseline_rss_mib"]["jax"] > 0
    assert report["baseline_rss_mib"]["torch"] > 0

    assert len(report["results"]) == 2 * 3 * 2
    for entry in report["results"]:
        assert entry["status"] == "ok", entry
        assert len(entry["times_s"]) == 2
        assert entry["median_s"] > 0
        assert entry["tokens_per_s"] == pytest.approx(entry["length"] / entry["median_s"])
        # A model this small can stay within the import-only baseline's peak, so zero is valid.
        assert entry["peak_rss_mib"] >= 0
        if entry["variant"] == "pytorch":
            assert entry["compile_s"] is None
        else:
            assert entry["compile_s"] > 0

    assert {(r["length"], r["mode"]) for r in report["ratios"]} == {
        (length, mode) for length in (256, 512) for mode in ("forward", "train")
    }
    for row in report["ratios"]:
        assert row["speedup_vs_pytorch"] > 0
        assert row["long_over_full_time"] > 0

    assert report["dense_matmul"]["flops_per_s"] > 0
    assert [row["length"] for row in report["attention_kernel"]] == [256, 512]
    for row in report["attention_kernel"]:
        assert row["useful_flops"] == 4 * 65 * 32 * row["length"] * 2
        assert 0 < row["fraction_of_dense"]

    # The PyTorch model was loaded from an export of the longflax-long weights.
    assert report["parity"]["max_abs_diff"] < 1e-4

    assert markdown_path.read_text() in capsys.readouterr().out
