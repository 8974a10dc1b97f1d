"""Time the QA input pipeline: reading a SQuAD-format file, tokenising, building features, batching.

    python -m longflax.pipeline_bench --data data:squad/train-v1.1.reconstructed.json.gz \\
        [--tokenizer data:tokenizers/roberta-base] [--max-length 512] [--doc-stride 128] \\
        [--max-question-tokens 64] [--batch-size 32] [--limit N] [--json OUT]

It runs the functions of the QA stage in one process. For each step it reports the wall time
and the CPU time (user plus system, all threads). It also reports the number of features, the
peak resident memory and the time to assemble one training batch from the feature arrays. The
training loop assembles batches on a background thread while the previous step runs.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import logging


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed(name: str, function: Callable[[], Any], record: dict[str, Any]) -> Any:
    wall, cpu = time.perf_counter(), _cpu_seconds()
    result = function()
    record[name] = {"wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(_cpu_seconds() - cpu, 2)}
    print(f"[pipeline] {name}: {record[name]['wall_s']:.1f} s wall, {record[name]['cpu_s']:.1f} s CPU", flush=True)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m longflax.pipeline_bench",
        description="Time reading, tokenising and featurising a SQuAD-format training set.",
    )
    parser.add_argument("--data", required=True, help="SQuAD-format JSON file (.gz accepted) or a data: path.")
    parser.add_argument(
        "--tokenizer",
        default="data:tokenizers/roberta-base",
        help="Tokenizer directory, data: path or hub id (default: the roberta-base tokenizer).",
    )
    parser.add_argument("--max-length", type=int, default=512, help="Feature length in tokens.")
    parser.add_argument("--doc-stride", type=int, default=128, help="Context tokens shared by consecutive windows.")
    parser.add_argument("--max-question-tokens", type=int, default=64, help="Questions are cut to this many tokens.")
    parser.add_argument("--batch-size", type=int, default=32, help="Rows per assembled training batch.")
    parser.add_argument("--limit", type=int, default=0, help="Use only the first N questions (0: all).")
    parser.add_argument("--json", default=None, help="Write the report as JSON to this file.")
    return parser


def run(args: argparse.Namespace, command: str = "") -> dict[str, Any]:
    """Run every pipeline step once and return the report."""
    import numpy as np

    from longflax.bench import _code_version, _core_count, _machine_info, _versions
    from longflax.data.qa_features import prepare_qa_features
    from longflax.stages import (
        _feature_arrays,
        _FeatureBatches,
        load_examples,
        load_tokenizer,
        row_multiple,
    )

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive number of rows, got {args.batch_size}.")
    if args.limit < 0:
        raise ValueError(f"--limit must be 0 (all questions) or a positive count, got {args.limit}.")
    steps: dict[str, Any] = {}
    examples = _timed(
        "read and validate", lambda: load_examples(args.data, on_invalid="skip", limit=args.limit), steps
    )
    tokenizer = _timed("load tokenizer", lambda: load_tokenizer(args.tokenizer), steps)
    features = _timed(
        "tokenise and build features",
        lambda: prepare_qa_features(
            examples, tokenizer, max_length=args.max_length, doc_stride=args.doc_stride,
            max_question_tokens=args.max_question_tokens, training=True,
            pad_to_multiple_of=row_multiple(args.max_length),
        ),
        steps,
    )
    arrays = _timed("convert to int32 arrays", lambda: _feature_arrays(features, training=True), steps)
    batches = _FeatureBatches(arrays, min(args.batch_size, len(features)), seed=0)
    count = min(batches.batches_per_epoch, 200)

    def assemble() -> None:
        for _ in range(count):
            next(batches)

    _timed("assemble batches", assemble, steps)
    per_batch_ms = 1000 * steps["assemble batches"]["wall_s"] / max(count, 1)
    prepare = ("read and validate", "tokenise and build features", "convert to int32 arrays")
    total_wall = sum(steps[name]["wall_s"] for name in prepare)
    total_cpu = sum(steps[name]["cpu_s"] for name in prepare)
    lengths = np.asarray(features.attention_mask).sum(axis=1)
    return {
        "command": command,
        "data": args.data,
        "tokenizer": args.tokenizer,
        "max_length": args.max_length,
        "doc_stride": args.doc_stride,
        "max_question_tokens": args.max_question_tokens,
        "questions": len(examples),
        "features": len(features),
        "row_length": int(np.asarray(features.input_ids).shape[1]),
        "mean_tokens_per_feature": round(float(lengths.mean()), 1),
        "steps": steps,
        "data_to_arrays_wall_s": round(total_wall, 2),
        "data_to_arrays_cpu_s": round(total_cpu, 2),
        "batch_size": batches.batch_size,
        "batches_assembled": count,
        "ms_per_batch": round(per_batch_ms, 3),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30, 2),
        "cores": _core_count(),
        "machine": _machine_info(),
        "versions": _versions(),
        "code": _code_version(),
    }


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"{report['questions']} questions -> {report['features']} features of {report['row_length']} tokens "
        f"(max_length {report['max_length']}, stride {report['doc_stride']}, "
        f"{report['mean_tokens_per_feature']} real tokens per feature on average)",
        "",
        "| step | wall s | CPU s |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {value['wall_s']} | {value['cpu_s']} |" for name, value in report["steps"].items()]
    lines += [
        "",
        f"File to int32 arrays: {report['data_to_arrays_wall_s']} s wall, {report['data_to_arrays_cpu_s']} s CPU "
        f"on {report['cores']} cores; one batch of {report['batch_size']} rows: {report['ms_per_batch']} ms; "
        f"peak memory {report['peak_rss_gib']} GiB.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = "python -m longflax.pipeline_bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        report = run(args, command)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(render_markdown(report))
    if args.json:
        pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    logging.set_verbosity(logging.WARNING)
    sys.exit(main())
