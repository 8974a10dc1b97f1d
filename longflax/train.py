"""Run the stages of an experiment: convert -> mlm -> qa -> evaluate -> export.

    python -m longflax.train --config configs/<name>.py --workdir DIR [--config.key=value ...]

`--config.key=value` overrides a field of the config; a misspelt key is an error. Running the
same command again resumes: finished stages are skipped and an unfinished training stage
continues from its latest checkpoint (see `longflax.stages` for the full resume order).
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from longflax.configuration import validate_config

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; every stage writes under DIR/<stage>/.")


def run(config, workdir: str | os.PathLike) -> dict:
    """Run every stage of `config.stages` in `workdir`, skipping finished ones; return the summaries."""
    import jax

    from longflax import sharding, stages

    validate_config(config)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = sharding.make_mesh(dict(config.mesh))
    context = stages.RunContext(config, workdir, mesh)
    logging.info(
        "Run in %s on %d %s device(s), mesh %s; stages %s.",
        workdir, jax.device_count(), jax.devices()[0].platform, dict(mesh.shape), list(config.stages),
    )
    summaries = {}
    for stage in config.stages:
        if context.is_done(stage):
            logging.info("Stage %s is already done in %s; skipping it.", stage, workdir / stage)
            print(f"[{stage}] already done, skipping", flush=True)
            changed = _changed_settings(config, workdir / stage / "config.json", stage)
            if changed:
                message = (
                    f"[{stage}] warning: the finished stage ran with other settings ({', '.join(changed)}); "
                    "they are not applied. Use a new --workdir to run the stage with the current config."
                )
                logging.warning("%s", message)
                print(message, flush=True)
            summaries[stage] = json.loads((workdir / stage / "done.json").read_text())
            continue
        print(f"[{stage}] starting", flush=True)
        started = time.perf_counter()
        summary = stages.RUNNERS[stage](context)
        summary["seconds"] = round(time.perf_counter() - started, 1)
        context.mark_done(stage, summary)
        summaries[stage] = summary
        print(f"[{stage}] done in {summary['seconds']:.0f} s", flush=True)
    return summaries


def _changed_settings(config, saved_path: pathlib.Path, stage: str) -> list[str]:
    """Return the dotted keys of `stage` and `seed` whose values differ from the saved config."""
    if not saved_path.exists():
        return []
    saved = json.loads(saved_path.read_text())
    current = json.loads(config.to_json_best_effort())

    def flatten(value, prefix: str) -> dict:
        if isinstance(value, dict):
            items = {}
            for key, inner in value.items():
                items.update(flatten(inner, f"{prefix}.{key}"))
            return items
        return {prefix: value}

    before = {**flatten(saved.get(stage, {}), stage), "seed": saved.get("seed")}
    after = {**flatten(current.get(stage, {}), stage), "seed": current.get("seed")}
    return sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))


class _QuietLibraries:
    """Drop INFO records that Orbax writes for every save and restore; warnings still pass."""

    def filter(self, record) -> bool:
        return record.levelno >= 30 or "/orbax/" not in record.pathname


def main(argv: list[str]) -> None:
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _WORKDIR.value is None:
        raise app.UsageError("--workdir is required.")
    try:
        run(_CONFIG.value, _WORKDIR.value)
    except ValueError as error:
        logging.error("%s", error)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def _innermost_message(error: BaseException) -> str:
    """Return the text of an error whose first argument may itself be an error (ml_collections)."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    if isinstance(error, KeyError) and error.args and isinstance(error.args[0], str):
        return f"unknown config key {error.args[0]}"
    return str(error)


def _parse_flags(argv: list[str]) -> list[str]:
    """Parse the command line; a bad config file or override exits with one clear line."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, ImportError, OSError) as error:
        print(
            f"error: invalid --config or override ({type(error).__name__}): {_innermost_message(error)}\n"
            "Usage: python -m longflax.train --config configs/<name>.py[:ARGUMENT] --workdir DIR "
            "[--config.KEY=VALUE ...]; the config file's docstring lists its arguments.",
            file=sys.stderr,
        )
        sys.exit(2)


def entry_point() -> None:
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    entry_point()
