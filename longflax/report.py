"""Write `report.md` and `report.json` for a run directory, with plots.

    python -m longflax.report --workdir DIR

Reads what the stages wrote (`done.json`, `metrics.jsonl`, `eval_*.json`, `results.json`,
`verification.json`) and renders: the masked-LM figures before and after training, the loss
curves, the evaluation table (EM/F1 per set and language), F1 by the position of the gold
context, the export check and the time of each stage.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time
from typing import Any

from longflax.metrics_writer import read_metrics

STAGES = ("convert", "mlm", "qa", "evaluate", "export")


def _read_json(path: pathlib.Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def collect(workdir: pathlib.Path) -> dict[str, Any]:
    """Gather every stage's outputs into one JSON-serialisable record."""
    report: dict[str, Any] = {"workdir": str(workdir), "generated": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": _machine()}
    report["stages"] = {s: _read_json(workdir / s / "done.json") for s in STAGES if (workdir / s / "done.json").exists()}
    config = _read_json(workdir / "qa" / "config.json") or _read_json(workdir / "evaluate" / "config.json")
    if config:
        report["seed"] = config.get("seed")
        qa = config.get("qa", {})
        report["qa_training"] = {k: qa.get(k) for k in ("train_file", "train_limit", "max_length", "doc_stride", "batch_size", "epochs", "learning_rate")}
    report["mlm"] = {"before": _read_json(workdir / "mlm" / "eval_before.json"), "after": _read_json(workdir / "mlm" / "eval_after.json")}
    report["evaluation"] = _read_json(workdir / "evaluate" / "results.json") or {}
    report["export_check"] = _read_json(workdir / "export" / "verification.json")
    report["curves"] = {
        stage: [
            {"step": r["step"], "loss": r["train/loss"]}
            for r in read_metrics(workdir / stage / "metrics.jsonl")
            if "train/loss" in r
        ]
        for stage in ("mlm", "qa")
    }
    return report


def _plot(report: dict[str, Any], workdir: pathlib.Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    curves = {k: v for k, v in report["curves"].items() if v}
    if curves:
        fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5), squeeze=False)
        for ax, (stage, points) in zip(axes[0], curves.items(), strict=True):
            ax.plot([p["step"] for p in points], [p["loss"] for p in points], marker=".")
            ax.set_title(f"{stage} training loss")
            ax.set_xlabel("optimizer update")
            ax.set_ylabel("loss (nats)")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(workdir / "loss_curves.png", dpi=110)
        plt.close(fig)
        written.append("loss_curves.png")
    languages = {k: v for k, v in report["evaluation"].items() if k.startswith(("xquad-", "tydiqa-"))}
    if languages:
        fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(languages)), 3.8))
        names = list(languages)
        ax.bar(range(len(names)), [languages[n]["f1"] for n in names], label="F1")
        ax.bar(range(len(names)), [languages[n]["exact_match"] for n in names], width=0.5, label="EM")
        ax.set_xticks(range(len(names)), names, rotation=70, fontsize=8)
        ax.set_ylabel("score (%)")
        ax.legend()
        ax.set_title("Zero-shot EM / F1 per language")
        fig.tight_layout()
        fig.savefig(workdir / "languages.png", dpi=110)
        plt.close(fig)
        written.append("languages.png")
    positions = {k: v["by_gold_position"] for k, v in report["evaluation"].items() if v.get("by_gold_position")}
    if positions:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for name, groups in positions.items():
            keys = sorted(groups, key=lambda g: int(g))
            ax.plot([int(k) for k in keys], [groups[k]["f1"] for k in keys], marker="o", label=name)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("position of the gold context (0 = first)")
        ax.set_ylabel("F1 (%)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(workdir / "gold_position.png", dpi=110)
        plt.close(fig)
        written.append("gold_position.png")
    return written


def render_markdown(report: dict[str, Any], images: list[str]) -> str:
    lines = [f"# longflax run report: {report['workdir']}", ""]
    lines += [f"Generated {report['generated']} on {report['machine']}.", ""]
    if report.get("stages"):
        lines += ["## Stages", "", "| stage | seconds | finished |", "|---|---:|---|"]
        for name, done in report["stages"].items():
            lines.append(f"| {name} | {done.get('seconds', '')} | {done.get('finished', '')} |")
        lines.append("")
    before, after = report["mlm"]["before"], report["mlm"]["after"]
    if before or after:
        lines += ["## Masked-LM evaluation", "", "Bits per token is the loss over ln 2 per masked subword token (what Longformer-style papers call BPC); bits per character divides the total bits by the characters the masked tokens cover.", ""]
        lines += ["| | loss (nats) | perplexity | bits per token | bits per character | masked tokens |", "|---|---:|---:|---:|---:|---:|"]
        for name, values in (("before", before), ("after", after)):
            if values:
                lines.append(
                    f"| {name} | {values['loss']:.3f} | {values['perplexity']:.1f} | {values['bits_per_token']:.3f} | "
                    f"{values.get('bits_per_character', float('nan')):.3f} | {int(values.get('num_tokens', 0))} |"
                )
        lines.append("")
    if report.get("qa_training"):
        lines += ["## QA training", "", "```", json.dumps(report["qa_training"], indent=1), "```", f"Seed: {report.get('seed')}", ""]
    if report["evaluation"]:
        lines += ["## Evaluation (EM / F1 in percent, official SQuAD v1.1 or MLQA rules)", ""]
        lines += ["| set | questions | max length | EM | F1 |", "|---|---:|---:|---:|---:|"]
        for name, values in report["evaluation"].items():
            lines.append(
                f"| {name} | {values['examples']} | {values['max_length']} | {values['exact_match']:.1f} | {values['f1']:.1f} |"
            )
        lines.append("")
        for name, values in report["evaluation"].items():
            if values.get("by_gold_position"):
                lines += [f"F1 by gold-context position, {name}:", "", "| position | questions | EM | F1 |", "|---:|---:|---:|---:|"]
                for position, group in sorted(values["by_gold_position"].items(), key=lambda item: int(item[0])):
                    lines.append(f"| {position} | {group['count']} | {group['exact_match']:.1f} | {group['f1']:.1f} |")
                lines.append("")
    check = report.get("export_check")
    if check:
        lines += [
            "## Export check (Hugging Face PyTorch)", "",
            f"{check['hf_class']} loaded with {len(check['missing_keys'])} missing and {len(check['unexpected_keys'])} unexpected keys; "
            f"{check['same_answers']} of {check['questions']} answers identical to longflax; max |logit difference| {check['max_abs_logit_difference']:.2e}.",
            "",
        ]
    for image in images:
        lines += [f"![{image}]({image})", ""]
    return "\n".join(lines)


def write_report(workdir: str | os.PathLike) -> pathlib.Path:
    workdir = pathlib.Path(workdir)
    if not workdir.is_dir():
        raise ValueError(f"{workdir} is not a run directory.")
    report = collect(workdir)
    if not report["stages"]:
        raise ValueError(f"No finished stage found in {workdir} (no <stage>/done.json); run longflax.train first.")
    images = _plot(report, workdir)
    (workdir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (workdir / "report.md").write_text(render_markdown(report, images))
    return workdir / "report.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m longflax.report", description="Write report.md and report.json for a run.")
    parser.add_argument("--workdir", required=True, help="Run directory written by longflax.train.")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.workdir)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(path.read_text())
    print(f"wrote {path} and {path.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
