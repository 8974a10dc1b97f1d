"""Export a longflax model to a Hugging Face (PyTorch) model directory.

    python -m longflax.export --checkpoint DIR --output DIR [--head mlm|qa|none]

DIR may be a longflax model directory, a stage directory of a run (`workdir/qa`) or a run
directory. Long models are written as `model_type: longformer`, full-attention models as their
source family; the output loads with `AutoModelForMaskedLM`, `AutoModelForQuestionAnswering`
or `AutoModel.from_pretrained` in transformers 5.x.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from absl import logging

from longflax import hf_weights, model_io


def export_model(model, output: str | pathlib.Path, *, head: str, tokenizer=None) -> pathlib.Path:
    """Write config.json, model.safetensors and the tokenizer for the given head.

    With head "none", a model without a pooler (masked-LM and QA models) is written with a newly
    initialised pooler, because transformers' `AutoModel` always builds one.
    """
    from safetensors.numpy import save_file

    from longflax.modeling.encoder import head_of

    stored = head_of(model)
    if head != stored:
        if head != "none":
            raise ValueError(
                f"The checkpoint has head {stored!r}; it can be exported with --head {stored} or --head none."
            )
        model = _without_head(model)
    output = pathlib.Path(output)
    output.mkdir(parents=True, exist_ok=True)
    config = hf_weights.hf_config_for_export(model.config, head)
    state_dict = hf_weights.export_state_dict(model, model.config, head)
    save_file(state_dict, str(output / "model.safetensors"), metadata={"format": "pt"})
    (output / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(output))
    return output


def _without_head(model):
    import numpy as np

    arrays = {path: np.asarray(var[...]) for path, var in hf_weights.flat_params(model).items()}
    from longflax.modeling.encoder import head_of

    return model_io.model_from_arrays(model.config, arrays, head="none", source_head=head_of(model))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m longflax.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="longflax model, stage or run directory.")
    parser.add_argument("--output", required=True, help="Directory for the Hugging Face model.")
    parser.add_argument(
        "--head", choices=["mlm", "qa", "none"], default=None, help="Head to export (default: the stored head)."
    )
    args = parser.parse_args(argv)
    directory = model_io.find_model_directory(args.checkpoint)
    if directory is None:
        print(
            f"error: no longflax model found at {args.checkpoint} (looked for {model_io.MODEL_FILE} "
            "there, in model/ and in the stage directories of a run). Orbax training checkpoints "
            "(<stage>/checkpoints/<step>) hold optimizer state, not an exportable model: pass the "
            "stage directory, whose model/ folder holds the final weights.",
            file=sys.stderr,
        )
        return 2
    try:
        model, tokenizer = model_io.load(directory)
        head = args.head or model_io.read_model_record(directory)["head"]
        output = export_model(model, args.output, head=head, tokenizer=tokenizer)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    config = json.loads((output / "config.json").read_text())
    print(f"checkpoint:  {directory}")
    print(f"output:      {output}")
    print(f"model_type:  {config['model_type']} ({config['architectures'][0]})")
    print(f"positions:   {config['max_position_embeddings']}")
    return 0


if __name__ == "__main__":
    logging.set_verbosity(logging.WARNING)
    sys.exit(main())
