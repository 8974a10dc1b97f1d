"""Side-by-side speed and memory benchmark of longflax and the PyTorch Longformer.

    python -m longflax.bench [--quick | --preset small|base] [--lengths 512,1024,...]
        [--layers 4 --hidden 256 --heads 4 --window 512] [--repeats 5] [--global-tokens 0]
        [--json OUT] [--markdown OUT]

For every sequence length it times a training step (forward and backward of the scalar loss
mean(last_hidden_state ** 2)) and a forward pass of three variants with the same model shape:

  longflax-long  longflax with Longformer sliding-window attention, under `jax.jit`.
  longflax-full  longflax with full softmax attention, under `jax.jit`.
  pytorch        transformers' `LongformerModel`, loaded from an export of the longflax-long
                 model. Both run the same weights, checked by comparing their outputs.

Batch 1, float32, dropout off. Each variant x length runs in its own subprocess, which first
runs the forward pass and then the training step. Peak memory is the subprocess's maximum
resident set size (`getrusage(RUSAGE_SELF).ru_maxrss`) minus that of a baseline subprocess that
only imports the same libraries. The training figure is the peak of the whole subprocess,
so it is the larger of the forward and training peaks. PyTorch uses as many threads as the
process may use cores; XLA uses its own thread pool.

A separate subprocess measures the dense-matmul FLOP/s of the machine with a jitted float32
matmul of the model's feed-forward shape, and the useful FLOP/s of the banded attention
kernel alone (forward), counting 2 * (2w + 1) * H FLOPs per query and head for the scores and
as many for the value product.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import pathlib
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import logging

VARIANTS = ("longflax-long", "longflax-full", "pytorch")
MODES = ("forward", "train")
DEFAULT_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)

# Model shapes and run sizes of each preset. Explicit command-line options override them.
PRESETS: dict[str, dict[str, Any]] = {
    "small": {
        "layers": 4,
        "hidden": 256,
        "heads": 4,
        "mlp_dim": 1024,
        "window": 512,
        "vocab_size": 1000,
        "lengths": DEFAULT_LENGTHS,
        "repeats": 5,
    },
    # XLM-R base shapes. Positions are sized to the longest length, which is 4098 (the
    # converted XLM-R base table) for the default length 4096.
    "base": {
        "layers": 12,
        "hidden": 768,
        "heads": 12,
        "mlp_dim": 3072,
        "window": 512,
        "vocab_size": 250002,
        "lengths": (4096,),
        "repeats": 5,
    },
    "quick": {
        "layers": 2,
        "hidden": 64,
        "heads": 2,
        "mlp_dim": 256,
        "window": 64,
        "vocab_size": 1000,
        "lengths": (256, 512),
        "repeats": 2,
    },
}

# Bytes per L x L attention score that full attention needs at its peak: per layer for the
# training step, which keeps every layer's probabilities for the backward pass, and for one layer
# in the forward pass. These are estimates, fitted to the peaks measured at 2048 and 4096
# tokens (4 layers x 4 heads, float32, 2-core AMD EPYC): about 16.8 and 10.7 bytes.
FULL_ATTENTION_TRAIN_BYTES_PER_SCORE = 16
FULL_ATTENTION_FORWARD_BYTES_PER_SCORE = 12


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """Model shape and run options of one benchmark run."""

    preset: str
    layers: int
    hidden: int
    heads: int
    mlp_dim: int
    window: int
    vocab_size: int
    lengths: tuple[int, ...]
    repeats: int
    global_tokens: int = 0
    memory_limit_gib: float = 16.0
    timeout_s: float = 3600.0
    remat: str = "none"
    kernel_block_sizes: tuple[int, ...] = ()
    variants: tuple[str, ...] = VARIANTS
    seed: int = 0

    @property
    def radius(self) -> int:
        """One-sided attention radius w: each token attends to w tokens on each side."""
        return self.window // 2

    def padded_length(self, length: int) -> int:
        """Length after padding to a multiple of the window, as both implementations do."""
        return -(-length // self.window) * self.window

    def model_config(self, attention: str) -> dict[str, Any]:
        """Return the `ModelConfig` fields for one attention kind ("longformer" or "full")."""
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden,
            "num_layers": self.layers,
            "num_heads": self.heads,
            "mlp_dim": self.mlp_dim,
            # RoBERTa numbering: real tokens start at position pad_token_id + 1 = 2.
            "max_position_embeddings": self.padded_length(max(self.lengths)) + 2,
            "family": "roberta",
            "dropout_rate": 0.0,
            "attention_dropout_rate": 0.0,
            "attention": attention,
            "attention_window": (self.window,) * self.layers if attention == "longformer" else (),
            "max_global_tokens": max(self.global_tokens, 1),
            "remat": self.remat,
        }


def parse_lengths(text: str, option: str = "--lengths") -> tuple[int, ...]:
    """Parse a comma-separated list of positive integers such as "512,1024".

    Raises:
        ValueError: if an item is not a positive integer.
    """
    items = [item.strip() for item in text.split(",") if item.strip()]
    values = []
    for item in items:
        if not item.isdigit() or int(item) <= 0:
            raise ValueError(
                f"{option}={text!r} must be a comma-separated list of positive integers, "
                f"such as 512,1024; {item!r} is not one."
            )
        values.append(int(item))
    if not values:
        raise ValueError(f"{option}={text!r} is empty; give at least one positive integer.")
    return tuple(values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m longflax.bench",
        description="Time and measure longflax (long and full attention) against PyTorch Longformer.",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        action="store_true",
        help="Tiny smoke run: 2 layers, 64 wide, window 64, lengths 256 and 512, 2 repeats.",
    )
    size.add_argument(
        "--preset",
        choices=["small", "base"],
        default=None,
        help="small: 4 layers x 256 wide x 4 heads, lengths 512..16384 (default). "
        "base: XLM-R base shapes (12 x 768 x 12 heads, vocab 250002), length 4096.",
    )
    parser.add_argument(
        "--lengths", default=None, help="Comma-separated sequence lengths in tokens."
    )
    parser.add_argument("--layers", type=int, default=None, help="Number of encoder layers.")
    parser.add_argument("--hidden", type=int, default=None, help="Hidden size (model width).")
    parser.add_argument("--heads", type=int, default=None, help="Number of attention heads.")
    parser.add_argument(
        "--mlp-dim", type=int, default=None, help="Feed-forward width (default: 4 x hidden)."
    )
    parser.add_argument(
        "--window",
        type=int,
        default=None,
        help="Hugging Face attention_window: the full two-sided width, window // 2 per side.",
    )
    parser.add_argument("--vocab-size", type=int, default=None, help="Vocabulary size.")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="Timed runs after warm-up; the median is reported.",
    )
    parser.add_argument(
        "--global-tokens",
        type=int,
        default=0,
        help="Give the first N tokens global attention (long variants only; default 0).",
    )
    parser.add_argument(
        "--memory-limit-gib",
        type=float,
        default=16.0,
        help="Skip full attention where its estimated score buffers exceed this many GiB.",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=3600.0,
        help="Seconds after which one subprocess is stopped.",
    )
    parser.add_argument(
        "--remat",
        choices=["none", "full", "dots"],
        default="none",
        help="Rematerialisation of each layer in the longflax backward pass.",
    )
    parser.add_argument(
        "--kernel-block-sizes",
        default=None,
        help="Also time the banded attention kernel with these query block sizes (comma-separated).",
    )
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"Comma-separated subset of {', '.join(VARIANTS)}.",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="Seed of the random weights and tokens."
    )
    parser.add_argument("--json", default=None, help="Write the full report as JSON to this file.")
    parser.add_argument("--markdown", default=None, help="Write the markdown tables to this file.")
    parser.add_argument("--worker-spec", default=None, help=argparse.SUPPRESS)
    return parser


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    """Resolve the preset and the explicit options into validated settings.

    Raises:
        ValueError: if an option is out of range or the options contradict each other.
    """
    preset = "quick" if args.quick else (args.preset or "small")
    values = dict(PRESETS[preset])
    for name in ("layers", "hidden", "heads", "window", "vocab_size", "repeats"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.mlp_dim is not None:
        values["mlp_dim"] = args.mlp_dim
    elif args.hidden is not None:
        values["mlp_dim"] = 4 * args.hidden
    if args.lengths is not None:
        values["lengths"] = parse_lengths(args.lengths)
    block_sizes = ()
    if args.kernel_block_sizes:
        block_sizes = parse_lengths(args.kernel_block_sizes, "--kernel-block-sizes")
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    settings = BenchSettings(
        preset=preset,
        layers=values["layers"],
        hidden=values["hidden"],
        heads=values["heads"],
        mlp_dim=values["mlp_dim"],
        window=values["window"],
        vocab_size=values["vocab_size"],
        lengths=tuple(values["lengths"]),
        repeats=values["repeats"],
        global_tokens=args.global_tokens,
        memory_limit_gib=args.memory_limit_gib,
        timeout_s=args.timeout,
        remat=args.remat,
        kernel_block_sizes=block_sizes,
        variants=variants,
        seed=args.seed,
    )
    validate_settings(settings)
    return settings


def validate_settings(settings: BenchSettings) -> None:
    """Check the settings before any subprocess starts.

    Raises:
        ValueError: naming the option, its value and the constraint.
    """
    for name in ("layers", "hidden", "heads", "mlp_dim", "vocab_size"):
        if getattr(settings, name) <= 0:
            raise ValueError(
                f"--{name.replace('_', '-')}={getattr(settings, name)} must be positive."
            )
    if settings.hidden % settings.heads:
        raise ValueError(
            f"--hidden={settings.hidden} is not divisible by --heads={settings.heads}; "
            "choose a head count that divides the hidden size."
        )
    if settings.window <= 0 or settings.window % 2:
        raise ValueError(
            f"--window={settings.window} must be even and positive: it is the full two-sided "
            "width, and each token sees window // 2 tokens on each side."
        )
    if settings.repeats < 1:
        raise ValueError(
            f"--repeats={settings.repeats} must be at least 1 (use 5 or more for reports)."
        )
    if not 0 <= settings.global_tokens < min(settings.lengths):
        raise ValueError(
            f"--global-tokens={settings.global_tokens} must be at least 0 and below the shortest "
            f"length {min(settings.lengths)}."
        )
    if settings.memory_limit_gib <= 0:
        raise ValueError(f"--memory-limit-gib={settings.memory_limit_gib} must be positive.")
    if settings.timeout_s <= 0:
        raise ValueError(f"--timeout={settings.timeout_s} must be positive.")
    unknown = sorted(set(settings.variants) - set(VARIANTS))
    if unknown or not settings.variants:
        raise ValueError(
            f"--variants={','.join(settings.variants)!r} names unknown variants {unknown}; "
            f"use a comma-separated subset of {', '.join(VARIANTS)}."
        )
    if "pytorch" in settings.variants and "longflax-long" not in settings.variants:
        raise ValueError(
            "--variants includes pytorch but not longflax-long; the PyTorch model is loaded from "
            "an export of the longflax-long model, so include longflax-long."
        )


def estimate_full_attention_bytes(settings: BenchSettings, length: int, mode: str) -> int:
    """Estimate the peak memory of full attention's score buffers at one length.

    Args:
      settings: the model shape.
      length: sequence length in tokens.
      mode: "forward" (one layer's scores alive at a time) or "train" (every layer's scores
        kept for the backward pass).

    Returns:
      The estimate in bytes. Parameters and activations of size L x D are not counted.
    """
    scores = settings.heads * length * length
    if mode == "train":
        return scores * settings.layers * FULL_ATTENTION_TRAIN_BYTES_PER_SCORE
    return scores * FULL_ATTENTION_FORWARD_BYTES_PER_SCORE


# ---------------------------------------------------------------------------------------------
# Worker side: each function below runs inside its own subprocess.


def _peak_rss_bytes() -> int:
    # ru_maxrss is in kilobytes on Linux and in bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _time_calls(call: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    """Return the time of the first (warm-up) call and of `repeats` further calls."""
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return first, times


def _call_and_wait(function: Callable[..., Any], *args: Any) -> Any:
    """Call a JAX function and wait until every output buffer is computed."""
    import jax

    return jax.block_until_ready(function(*args))


def _make_inputs(spec: dict[str, Any]):
    """Random token ids in [3, vocab) with `<s>` first; all tokens real; first N tokens global."""
    import numpy as np

    rng = np.random.default_rng(spec["seed"])
    length = spec["length"]
    ids = rng.integers(3, spec["vocab_size"], size=(1, length), dtype=np.int64)
    ids[:, 0] = 0
    mask = np.ones_like(ids)
    global_mask = None
    if spec["global_tokens"]:
        global_mask = np.zeros_like(ids)
        global_mask[:, : spec["global_tokens"]] = 1
    return ids, mask, global_mask


def _import_jax_side() -> None:
    import flax.nnx  # noqa: F401
    import jax  # noqa: F401

    import longflax.modeling  # noqa: F401


def _import_torch_side() -> None:
    import torch  # noqa: F401
    from transformers import LongformerModel  # noqa: F401


def _worker_baseline(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["side"] == "jax":
        _import_jax_side()
    else:
        _import_torch_side()
    return {"peak_rss_bytes": _peak_rss_bytes()}


def _worker_longflax(spec: dict[str, Any]) -> dict[str, Any]:
    _import_jax_side()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from longflax.modeling import ModelConfig, build_model

    config = ModelConfig.from_dict(spec["config"])
    model = build_model(config, "none", seed=spec["seed"])
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    del model
    ids, mask, global_mask = _make_inputs(spec)
    ids, mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
    if global_mask is not None:
        global_mask = jnp.asarray(global_mask, jnp.int32)

    def forward(params, ids, mask, global_mask):
        encoder = nnx.merge(graphdef, params, rest)
        return encoder(ids, mask, global_mask).last_hidden_state

    def loss(params, ids, mask, global_mask):
        return jnp.mean(forward(params, ids, mask, global_mask) ** 2)

    result: dict[str, Any] = {}
    for mode in spec["modes"]:
        function = forward if mode == "forward" else jax.value_and_grad(loss)
        start = time.perf_counter()
        compiled = jax.jit(function).lower(params, ids, mask, global_mask).compile()
        compile_s = time.perf_counter() - start

        call = functools.partial(_call_and_wait, compiled, params, ids, mask, global_mask)
        first_s, times = _time_calls(call, spec["repeats"])
        if mode == "forward" and spec.get("output_path"):
            np.save(spec["output_path"], np.asarray(call()))
        result[mode] = {
            "compile_s": compile_s,
            "first_call_s": first_s,
            "times_s": times,
            "peak_rss_bytes": _peak_rss_bytes(),
        }
    return result


def _worker_pytorch(spec: dict[str, Any]) -> dict[str, Any]:
    _import_torch_side()
    import numpy as np
    import torch
    from transformers import LongformerModel

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    model = LongformerModel.from_pretrained(spec["export_dir"], add_pooling_layer=False)
    # Dropout is 0 in the exported config, so train mode computes the same function as eval.
    model.train()
    ids, mask, global_mask = _make_inputs(spec)
    inputs = {"input_ids": torch.as_tensor(ids), "attention_mask": torch.as_tensor(mask)}
    if global_mask is not None:
        inputs["global_attention_mask"] = torch.as_tensor(global_mask)

    def forward():
        with torch.inference_mode():
            return model(**inputs).last_hidden_state

    def train_step():
        model.zero_grad(set_to_none=True)
        loss = model(**inputs).last_hidden_state.pow(2).mean()
        loss.backward()
        return loss

    result: dict[str, Any] = {}
    for mode in spec["modes"]:
        call = forward if mode == "forward" else train_step
        first_s, times = _time_calls(call, spec["repeats"])
        if mode == "forward" and spec.get("output_path"):
            np.save(spec["output_path"], forward().numpy())
        result[mode] = {
            "compile_s": None,
            "first_call_s": first_s,
            "times_s": times,
            "peak_rss_bytes": _peak_rss_bytes(),
        }
    return result


def _worker_prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """Export the longflax-long model for transformers, then time the kernels."""
    _import_jax_side()
    if spec.get("export_dir"):
        from longflax.export import export_model
        from longflax.modeling import ModelConfig, build_model

        config = ModelConfig.from_dict(spec["config"])
        export_model(
            build_model(config, "none", seed=spec["seed"]), spec["export_dir"], head="none"
        )
    if not spec["time_kernels"]:
        return {}
    return _time_kernels(spec)


def _time_kernels(spec: dict[str, Any]) -> dict[str, Any]:
    """Time a dense matmul of the feed-forward shape and the banded attention kernel alone."""
    import jax
    import jax.numpy as jnp

    from longflax.modeling import attention

    key = jax.random.key(spec["seed"])
    rows, hidden, mlp_dim = spec["matmul_shape"]
    x = jax.random.normal(key, (rows, hidden), jnp.float32)
    w = jax.random.normal(jax.random.fold_in(key, 1), (hidden, mlp_dim), jnp.float32)
    matmul = jax.jit(lambda a, b: jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST))
    _, times = _time_calls(functools.partial(_call_and_wait, matmul, x, w), max(spec["repeats"], 5))
    matmul_s = statistics.median(times)
    matmul_flops = 2 * rows * hidden * mlp_dim
    dense = {
        "shape": [rows, hidden, mlp_dim],
        "median_s": matmul_s,
        "flops_per_s": matmul_flops / matmul_s,
    }

    radius, heads, head_dim = spec["radius"], spec["heads"], spec["head_dim"]
    rows_out = []
    for length in spec["lengths"]:
        shape = (1, length, heads, head_dim)
        q = jax.random.normal(jax.random.fold_in(key, 2), shape, jnp.float32) / math.sqrt(head_dim)
        k = jax.random.normal(jax.random.fold_in(key, 3), shape, jnp.float32)
        v = jax.random.normal(jax.random.fold_in(key, 4), shape, jnp.float32)
        mask = jnp.ones((1, length), bool)
        default_block = attention.choose_block_size(length, radius)
        block_sizes = [default_block] + [
            size for size in spec["block_sizes"] if size != default_block and length % size == 0
        ]
        useful_flops = 4 * (2 * radius + 1) * head_dim * length * heads
        for block_size in block_sizes:
            kernel = functools.partial(
                attention.sliding_window_attention, radius=radius, block_size=block_size
            )
            call = functools.partial(_call_and_wait, jax.jit(kernel), q, k, v, mask)
            _, times = _time_calls(call, max(spec["repeats"], 5))
            median = statistics.median(times)
            rows_out.append(
                {
                    "length": length,
                    "block_size": block_size,
                    "default_block_size": block_size == default_block,
                    "median_s": median,
                    "useful_flops": useful_flops,
                    "flops_per_s": useful_flops / median,
                    "fraction_of_dense": useful_flops / median / dense["flops_per_s"],
                }
            )
    return {"dense_matmul": dense, "attention_kernel": rows_out}


WORKERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "baseline": _worker_baseline,
    "longflax": _worker_longflax,
    "pytorch": _worker_pytorch,
    "prepare": _worker_prepare,
}


def run_worker(spec_path: str) -> int:
    """Run one measurement described by a JSON spec file and write its result file."""
    spec = json.loads(pathlib.Path(spec_path).read_text())
    result = WORKERS[spec["worker"]](spec)
    pathlib.Path(spec["result_path"]).write_text(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------------
# Parent side: plans the runs, starts one subprocess per measurement and assembles the report.


def _child_environment() -> dict[str, str]:
    """Environment of the subprocesses: one real CPU device for XLA, Hugging Face offline."""
    env = dict(os.environ)
    flags = [
        flag
        for flag in env.get("XLA_FLAGS", "").split()
        if not flag.startswith("--xla_force_host_platform_device_count")
    ]
    env["XLA_FLAGS"] = " ".join(flags)
    # The subprocesses import this package, which need not be installed.
    package_root = str(pathlib.Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


def _spawn(
    spec: dict[str, Any], workdir: pathlib.Path, name: str, timeout_s: float
) -> dict[str, Any]:
    """Run one worker subprocess; return its result, or a failure record with the reason."""
    spec = dict(spec, result_path=str(workdir / f"{name}.result.json"))
    spec_path = workdir / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    command = [sys.executable, "-m", "longflax.bench", "--worker-spec", str(spec_path)]
    start = time.perf_counter()
    try:
        process = subprocess.run(
            command,
            env=_child_environment(),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        logging.error("Benchmark subprocess %s timed out after %g s.", name, timeout_s)
        return {"failed": f"timed out after {timeout_s:g} s (raise --timeout)"}
    wall_s = time.perf_counter() - start
    if process.returncode != 0:
        tail = process.stderr.strip().splitlines()[-3:]
        reason = f"exit code {process.returncode}"
        if process.returncode in (-9, 137):
            reason += " (killed, most likely out of memory)"
        logging.error("Benchmark subprocess %s failed with %s: %s", name, reason, " | ".join(tail))
        return {"failed": f"{reason}: {' | '.join(tail)}"}
    result = json.loads(pathlib.Path(spec["result_path"]).read_text())
    result["subprocess_wall_s"] = wall_s
    return result


def _machine_info() -> dict[str, Any]:
    model_name = platform.processor() or "unknown"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = None
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory_gib = round(pages / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {
        "cpu_model": model_name,
        "cores": _core_count(),
        "memory_gib": memory_gib,
        "platform": platform.platform(),
        "load_average_at_start": list(os.getloadavg()),
    }


def _core_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for package in ("jax", "jaxlib", "flax", "numpy", "torch", "transformers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _code_version() -> str:
    """Return `git describe --always --dirty` of the checkout, or "unknown" outside git."""
    package_root = pathlib.Path(__file__).resolve().parent.parent
    try:
        process = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=package_root,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return process.stdout.strip() or "unknown"


def _summarise(run: dict[str, Any], length: int, baseline_bytes: int) -> dict[str, Any]:
    times = run["times_s"]
    median = statistics.median(times)
    return {
        "status": "ok",
        "median_s": median,
        "times_s": times,
        "tokens_per_s": length / median,
        "compile_s": run["compile_s"],
        "first_call_s": run["first_call_s"],
        "peak_rss_mib": (run["peak_rss_bytes"] - baseline_bytes) / 2**20,
        "raw_peak_rss_mib": run["peak_rss_bytes"] / 2**20,
    }


def _plan_modes(settings: BenchSettings, variant: str, length: int) -> dict[str, str]:
    """Return the modes to skip at this length, each with its reason."""
    if variant != "longflax-full":
        return {}
    limit = settings.memory_limit_gib * 2**30
    skipped = {}
    for mode in MODES:
        estimate = estimate_full_attention_bytes(settings, length, mode)
        if estimate > limit:
            skipped[mode] = (
                f"skipped: full-attention score buffers estimated at {estimate / 2**30:.1f} GiB "
                f"exceed --memory-limit-gib={settings.memory_limit_gib:g}"
            )
    return skipped


def measure_baseline(side: str, workdir: pathlib.Path, timeout_s: float) -> int:
    """Return the peak RSS in bytes of a subprocess that only imports one side's libraries.

    Args:
      side: "jax" (jax, flax and longflax.modeling) or "torch" (torch and transformers'
        LongformerModel).
      workdir: directory for the spec and result files.
      timeout_s: limit for the subprocess.

    Raises:
        RuntimeError: if the subprocess fails or times out.
    """
    run = _spawn({"worker": "baseline", "side": side}, workdir, f"baseline-{side}", timeout_s)
    if "failed" in run:
        raise RuntimeError(
            f"The {side} baseline subprocess, which only imports the libraries, failed "
            f"({run['failed']}); check that the {side} side imports in this environment."
        )
    return run["peak_rss_bytes"]


def run_benchmark(settings: BenchSettings, command: str = "") -> dict[str, Any]:
    """Run every measurement in its own subprocess and return the report.

    Args:
      settings: validated settings (see `settings_from_args`).
      command: the command line, stored in the report.

    Returns:
      The report: settings, machine, versions, baselines, per-run results, kernel FLOP/s,
      ratios and the output parity check between longflax-long and PyTorch.
    """
    from tqdm import tqdm

    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command,
        "machine": _machine_info(),
        "versions": _versions(),
        "code_version": _code_version(),
        "settings": dataclasses.asdict(settings),
        "torch_threads": _core_count(),
        "xla_flags": _child_environment()["XLA_FLAGS"],
        "memory_method": (
            "peak RSS of each variant x length subprocess (getrusage RUSAGE_SELF ru_maxrss) minus "
            "the peak RSS of a baseline subprocess that only imports the same libraries; the "
            "train figure is the peak of the whole subprocess (forward pass, then training step)"
        ),
        "results": [],
    }
    lengths = sorted(settings.lengths)
    with tempfile.TemporaryDirectory(prefix="longflax-bench-") as tmp:
        workdir = pathlib.Path(tmp)
        export_dir = workdir / "export"
        prepare_spec = {
            "worker": "prepare",
            "seed": settings.seed,
            "config": settings.model_config("longformer"),
            "export_dir": str(export_dir) if "pytorch" in settings.variants else None,
            "time_kernels": "longflax-long" in settings.variants,
            "repeats": settings.repeats,
            "matmul_shape": [min(max(lengths), 4096), settings.hidden, settings.mlp_dim],
            "radius": settings.radius,
            "heads": settings.heads,
            "head_dim": settings.hidden // settings.heads,
            "lengths": [settings.padded_length(length) for length in lengths],
            "block_sizes": list(settings.kernel_block_sizes),
        }
        prepared = _spawn(prepare_spec, workdir, "prepare", settings.timeout_s)
        if "failed" in prepared:
            raise RuntimeError(
                f"Exporting the model and timing the kernels failed ({prepared['failed']})."
            )
        report["dense_matmul"] = prepared.get("dense_matmul")
        report["attention_kernel"] = prepared.get("attention_kernel", [])

        sides = ("jax", "torch") if "pytorch" in settings.variants else ("jax",)
        baselines = {side: measure_baseline(side, workdir, settings.timeout_s) for side in sides}
        report["baseline_rss_mib"] = {side: value / 2**20 for side, value in baselines.items()}

        cases = [(length, variant) for length in lengths for variant in settings.variants]
        progress = tqdm(cases, desc="bench", disable=not sys.stderr.isatty())
        for length, variant in progress:
            progress.set_postfix_str(f"{variant} {length}")
            skipped = _plan_modes(settings, variant, length)
            modes = [mode for mode in MODES if mode not in skipped]
            spec = {
                "worker": "pytorch" if variant == "pytorch" else "longflax",
                "seed": settings.seed,
                "length": length,
                "vocab_size": settings.vocab_size,
                "global_tokens": settings.global_tokens if variant != "longflax-full" else 0,
                "repeats": settings.repeats,
                "modes": modes,
                "threads": _core_count(),
                "export_dir": str(export_dir),
                "config": settings.model_config(
                    "full" if variant == "longflax-full" else "longformer"
                ),
            }
            if length == lengths[0] and variant in ("longflax-long", "pytorch"):
                spec["output_path"] = str(workdir / f"output-{variant}.npy")
            run = {}
            if modes:
                logging.info("Running %s at %d tokens (%s).", variant, length, ", ".join(modes))
                run = _spawn(spec, workdir, f"{variant}-{length}", settings.timeout_s)
            baseline = baselines["torch" if variant == "pytorch" else "jax"]
            for mode in MODES:
                entry: dict[str, Any] = {"variant": variant, "mode": mode, "length": length}
                if mode in skipped:
                    entry.update(status="skipped", reason=skipped[mode])
                elif "failed" in run:
                    entry.update(status="failed", reason=run["failed"])
                else:
                    entry.update(_summarise(run[mode], length, baseline))
                report["results"].append(entry)
        report["parity"] = _parity(workdir, lengths[0])
    report["ratios"] = _ratios(report["results"], lengths)
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    return report


def _parity(workdir: pathlib.Path, length: int) -> dict[str, Any] | None:
    """Compare the last hidden states of longflax-long and PyTorch at the shortest length."""
    import numpy as np

    paths = [workdir / f"output-{variant}.npy" for variant in ("longflax-long", "pytorch")]
    if not all(path.exists() for path in paths):
        return None
    ours, theirs = (np.load(path) for path in paths)
    return {"length": length, "max_abs_diff": float(np.max(np.abs(ours - theirs)))}


def _ratios(results: list[dict[str, Any]], lengths: Sequence[int]) -> list[dict[str, Any]]:
    """Compute speed and memory ratios per length and mode where both sides of a ratio ran."""
    index = {(r["variant"], r["mode"], r["length"]): r for r in results if r.get("status") == "ok"}
    rows = []
    for length in lengths:
        for mode in MODES:
            long = index.get(("longflax-long", mode, length))
            if long is None:
                continue
            row: dict[str, Any] = {"length": length, "mode": mode}
            torch_run = index.get(("pytorch", mode, length))
            full = index.get(("longflax-full", mode, length))
            if torch_run:
                row["speedup_vs_pytorch"] = torch_run["median_s"] / long["median_s"]
                # Tiny runs can peak below the import-only baseline, leaving 0 MiB.
                if torch_run["peak_rss_mib"] > 0:
                    row["memory_vs_pytorch"] = long["peak_rss_mib"] / torch_run["peak_rss_mib"]
            if full:
                row["long_over_full_time"] = long["median_s"] / full["median_s"]
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Output.


def _format(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def render_markdown(report: dict[str, Any]) -> str:
    """Render the report as markdown tables: timings, memory and compile time, kernel FLOP/s."""
    settings = report["settings"]
    lines = [
        f"Model: {settings['layers']} layers x {settings['hidden']} wide x {settings['heads']} heads, "
        f"feed-forward {settings['mlp_dim']}, vocab {settings['vocab_size']}, window "
        f"{settings['window']} ({settings['window'] // 2} per side), batch 1, float32, "
        f"{settings['global_tokens']} global tokens, median of {settings['repeats']} runs after "
        "one warm-up.",
        "",
    ]
    index = {(r["variant"], r["mode"], r["length"]): r for r in report["results"]}
    ratios = {(r["length"], r["mode"]): r for r in report["ratios"]}
    lengths = sorted({r["length"] for r in report["results"]})
    variants = [v for v in VARIANTS if v in settings["variants"]]

    def cell(entry: dict[str, Any] | None, field: str, digits: int = 3) -> str:
        if entry is None:
            return "-"
        if entry["status"] != "ok":
            return entry["status"]
        return _format(entry[field], digits)

    for mode, title in (
        ("train", "Training step (forward + backward)"),
        ("forward", "Forward pass"),
    ):
        lines.append(f"**{title}**: median seconds, with tokens/s in brackets")
        lines.append("")
        header = ["tokens", *variants, "long vs PyTorch (speedup)", "long / full (time)"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for length in lengths:
            cells = [str(length)]
            for variant in variants:
                entry = index.get((variant, mode, length))
                text = cell(entry, "median_s")
                if entry is not None and entry["status"] == "ok":
                    text += f" ({entry['tokens_per_s']:.0f})"
                cells.append(text)
            ratio = ratios.get((length, mode), {})
            cells.append(_format(ratio.get("speedup_vs_pytorch")))
            cells.append(_format(ratio.get("long_over_full_time")))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")

    lines.append(
        "**Peak memory** (MiB above the import-only baseline) and **compile time** of the first "
        "jitted call (s)"
    )
    lines.append("")
    header = ["tokens"]
    for variant in variants:
        header += [f"{variant} fwd MiB", f"{variant} train MiB"]
    header += [f"{v} compile fwd / train s" for v in variants if v != "pytorch"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for length in lengths:
        cells = [str(length)]
        for variant in variants:
            for mode in ("forward", "train"):
                cells.append(cell(index.get((variant, mode, length)), "peak_rss_mib", 4))
        for variant in variants:
            if variant == "pytorch":
                continue
            compile_cells = [
                cell(index.get((variant, mode, length)), "compile_s")
                for mode in ("forward", "train")
            ]
            cells.append(" / ".join(compile_cells))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")

    dense = report.get("dense_matmul")
    if dense:
        rows, hidden, mlp_dim = dense["shape"]
        lines.append(
            f"**Banded attention kernel, forward only.** Dense reference: jitted float32 matmul "
            f"({rows} x {hidden}) @ ({hidden} x {mlp_dim}) at {dense['flops_per_s'] / 1e9:.1f} "
            "GFLOP/s."
        )
        lines.append("")
        lines.append("| tokens (padded) | block size | median s | useful GFLOP/s | of dense |")
        lines.append("|---|---|---|---|---|")
        for row in report.get("attention_kernel", []):
            block = f"{row['block_size']}" + (" (default)" if row["default_block_size"] else "")
            lines.append(
                f"| {row['length']} | {block} | {_format(row['median_s'])} | "
                f"{row['flops_per_s'] / 1e9:.1f} | {row['fraction_of_dense']:.0%} |"
            )
        lines.append("")
    parity = report.get("parity")
    if parity:
        lines.append(
            f"Same weights: max |longflax-long - PyTorch| of the last hidden state at "
            f"{parity['length']} tokens = {parity['max_abs_diff']:.2e}."
        )
    skipped = [r for r in report["results"] if r["status"] != "ok"]
    for entry in skipped:
        lines.append(
            f"- {entry['variant']} {entry['mode']} at {entry['length']}: {entry['reason']}"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark from the command line; returns the process exit code."""
    args = build_parser().parse_args(argv)
    if args.worker_spec:
        return run_worker(args.worker_spec)
    try:
        settings = settings_from_args(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    command = "python -m longflax.bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    report = run_benchmark(settings, command.strip())
    markdown = render_markdown(report)
    print(markdown)
    if args.json:
        pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        pathlib.Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.markdown).write_text(markdown)
    return 0


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    sys.exit(main())
