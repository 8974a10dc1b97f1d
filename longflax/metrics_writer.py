"""Metric output: a JSONL file, TensorBoard event files and log lines, written on process 0 only.

clu's metric writers import TensorFlow; this writer uses the `tensorboard` package's event
file writer directly, so no TensorFlow is needed.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from collections.abc import Mapping

import jax
from absl import logging


def _is_main_process() -> bool:
    return jax.process_index() == 0


class MetricWriter:
    """Writes scalar metrics with namespaced keys (`train/loss`, `eval/f1`, `perf/tokens_per_second`)."""

    def __init__(self, directory: str | pathlib.Path):
        self.directory = pathlib.Path(directory)
        self._events = None
        self._jsonl = None
        if _is_main_process():
            self.directory.mkdir(parents=True, exist_ok=True)
            self._jsonl = (self.directory / "metrics.jsonl").open("a", encoding="utf-8")
            try:
                from tensorboard.summary.writer.event_file_writer import EventFileWriter

                self._events = EventFileWriter(str(self.directory / "tensorboard"))
            except ImportError:
                logging.warning("tensorboard is not installed; metrics go to metrics.jsonl only.")

    def write(self, step: int, metrics: Mapping[str, float], *, log: bool = True) -> None:
        if not _is_main_process():
            return
        clean = {k: float(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **clean}) + "\n")
        self._jsonl.flush()
        if self._events is not None:
            from tensorboard.compat.proto.event_pb2 import Event
            from tensorboard.compat.proto.summary_pb2 import Summary

            values = [Summary.Value(tag=k, simple_value=v) for k, v in clean.items() if math.isfinite(v)]
            self._events.add_event(Event(wall_time=time.time(), step=int(step), summary=Summary(value=values)))
        if log:
            text = ", ".join(f"{k}={_format(v)}" for k, v in clean.items())
            logging.info("step %d: %s", step, text)

    def flush(self) -> None:
        if self._events is not None:
            self._events.flush()

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def _format(value: float) -> str:
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.3e}"
    return f"{value:.4f}"


def read_metrics(path: str | pathlib.Path) -> list[dict[str, float]]:
    """Read a metrics.jsonl file back as a list of records."""
    path = pathlib.Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
