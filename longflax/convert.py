"""Convert a pre-trained encoder into a long (Longformer-style) model.

    python -m longflax.convert --source SRC --output DIR [--max-length 4096] [--attention-window 512]

SRC is a Hugging Face model directory, a hub id, or a longflax model directory. The position
table is extended by repeating the trained rows, the global query/key/value projections start
as independent copies of the local ones, and the tokenizer is saved with the new maximum length.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np
from absl import logging

from longflax import hf_weights, model_io
from longflax.modeling.config import ModelConfig
from longflax.modeling.encoder import head_of


def validate_conversion(config: ModelConfig, *, max_length: int, attention_window: int) -> None:
    """Reject settings that cannot give a working long model.

    Raises:
        ValueError: saying which option to change.
    """
    if attention_window <= 0 or attention_window % 2:
        raise ValueError(
            f"--attention-window={attention_window} must be even and positive: it is the full "
            "two-sided width, each token seeing attention_window // 2 tokens per side (512 is usual)."
        )
    if max_length <= config.max_sequence_length:
        raise ValueError(
            f"--max-length={max_length} must be larger than the source model's maximum of "
            f"{config.max_sequence_length} tokens; a conversion that does not extend the positions "
            "only changes the attention."
        )
    if attention_window > max_length:
        raise ValueError(
            f"--attention-window={attention_window} is larger than --max-length={max_length}; "
            "use a window no larger than the maximum length."
        )


def extend_position_table(table: np.ndarray, *, offset: int, new_rows: int) -> np.ndarray:
    """Extend a position table by repeating its trained rows.

    Rows before `offset` (the padding position of RoBERTa-style models) are copied unchanged,
    so no row stays uninitialised. Rows from `offset` on repeat the source rows `offset..`
    in order; a last partial copy is allowed, so any target length works.
    """
    trained = table[offset:]
    repeats = -(-(new_rows - offset) // trained.shape[0])
    tiled = np.concatenate([trained] * repeats, axis=0)[: new_rows - offset]
    return np.concatenate([table[:offset], tiled], axis=0)


def convert_to_long(
    model, *, max_length: int, attention_window: int, max_global_tokens: int = 64
):
    """Return a long-attention copy of `model` (same head) and its config.

    Args:
      model: a full-attention encoder from `longflax.load` or `build_model`.
      max_length: usable sequence length of the new model (special tokens included).
      attention_window: full two-sided window of every layer.
      max_global_tokens: global-attention slots of the new model.
    """
    config: ModelConfig = model.config
    validate_conversion(config, max_length=max_length, attention_window=attention_window)
    head = head_of(model)
    new_config = config.replace(
        attention="longformer",
        attention_window=(attention_window,) * config.num_layers,
        max_position_embeddings=max_length + config.position_offset,
        max_global_tokens=max_global_tokens,
    )
    arrays = {path: np.array(var[...]) for path, var in hf_weights.flat_params(model).items()}
    prefix = "" if head == "none" else "encoder/"
    table_path = f"{prefix}embeddings/position_embeddings/embedding"
    arrays[table_path] = extend_position_table(
        arrays[table_path], offset=config.position_offset, new_rows=new_config.max_position_embeddings
    )
    for layer in range(config.num_layers):
        for name in ("query", "key", "value"):
            for leaf in ("kernel", "bias"):
                source = f"{prefix}layers/{layer}/attention/{name}/{leaf}"
                # np.array copies: the global projections must not share storage with the
                # local ones, or training one would move the other.
                arrays[f"{prefix}layers/{layer}/attention/{name}_global/{leaf}"] = np.array(arrays[source])
    return model_io.model_from_arrays(new_config, arrays, head=head, source_head=head), new_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m longflax.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="Hugging Face directory, hub id or longflax model directory.")
    parser.add_argument("--output", required=True, help="Directory to write the long model to.")
    parser.add_argument("--max-length", type=int, default=4096, help="New maximum sequence length in tokens.")
    parser.add_argument(
        "--attention-window",
        type=int,
        default=512,
        help="Full two-sided local window in tokens (each token sees half of it per side).",
    )
    parser.add_argument("--max-global-tokens", type=int, default=64, help="Global-attention slots per row.")
    parser.add_argument("--head", choices=["mlm", "qa", "none"], default=None, help="Head of the output model.")
    args = parser.parse_args(argv)
    try:
        model, tokenizer = model_io.load(args.source, head=args.head)
        head = args.head or head_of(model)
        long_model, config = convert_to_long(
            model,
            max_length=args.max_length,
            attention_window=args.attention_window,
            max_global_tokens=args.max_global_tokens,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if tokenizer is not None:
        tokenizer.model_max_length = args.max_length
    output = model_io.save_model(
        args.output, long_model, head=head, tokenizer=tokenizer, metadata={"converted_from": str(args.source)}
    )
    num_params = sum(int(np.prod(v.shape)) for v in hf_weights.flat_params(long_model).values())
    print(f"source:            {args.source}")
    print(f"output:            {pathlib.Path(output)}")
    print(f"head:              {head}")
    print(f"parameters:        {num_params:,}")
    print(f"maximum length:    {model.config.max_sequence_length} -> {config.max_sequence_length} tokens")
    print(f"attention window:  {args.attention_window} ({args.attention_window // 2} per side), global slots {config.max_global_tokens}")
    if tokenizer is None:
        print("tokenizer:         none found in the source; pass one to later stages")
    return 0


if __name__ == "__main__":
    logging.set_verbosity(logging.WARNING)
    sys.exit(main())
