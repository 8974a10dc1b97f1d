"""Masked language modelling: dynamic masking on the host, the loss, and corpus-level metrics.

Masking runs in numpy before a batch is sent to the device. Each row gets a static number of
prediction slots (`max_predictions`), so the model computes vocabulary logits only at
`masked_positions` and every batch has the same shapes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Of the positions chosen for prediction, this fraction becomes the mask token, the next
# fraction a random token, and the rest stay unchanged (the BERT and RoBERTa recipe).
MASK_TOKEN_FRACTION = 0.8
RANDOM_TOKEN_FRACTION = 0.1


@dataclasses.dataclass(frozen=True, eq=False)
class MaskedBatch:
    """A batch with masked inputs and a fixed number P of prediction slots per row.

    Slots past a row's chosen positions are unused: position 0, label 0, weight 0, counts 0.

    Attributes:
        input_ids: (B, L) int32 token ids after masking.
        attention_mask: (B, L) int32, 1 for real tokens and 0 for padding.
        masked_positions: (B, P) int32 positions chosen for prediction, ascending within a row.
        masked_labels: (B, P) int32 original token ids at those positions.
        masked_weights: (B, P) float32, 1 for used slots and 0 for unused ones.
        masked_char_counts: (B, P) int32 characters of text covered by each predicted token.
        masked_byte_counts: (B, P) int32 UTF-8 bytes of text covered by each predicted token.
        num_capped_rows: Rows whose number of predictions was cut to `max_predictions`.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    masked_positions: np.ndarray
    masked_labels: np.ndarray
    masked_weights: np.ndarray
    masked_char_counts: np.ndarray
    masked_byte_counts: np.ndarray
    num_capped_rows: int


def _check_probability(mask_probability: float) -> None:
    if not 0.0 < mask_probability <= 1.0:
        raise ValueError(
            f"mask_probability must be in (0, 1]; got {mask_probability!r}. The usual value is "
            "0.15."
        )


def _num_predictions(num_maskable: np.ndarray | int, mask_probability: float) -> np.ndarray:
    """Return round(mask_probability * num_maskable), rounding halves up."""
    return np.floor(mask_probability * np.asarray(num_maskable) + 0.5).astype(np.int64)


def default_max_predictions(block_length: int, mask_probability: float = 0.15) -> int:
    """Return a number of prediction slots that no row of `block_length` tokens overflows.

    A row has at most `block_length - 2` maskable tokens (its start and end tokens are special),
    and `mask_tokens` chooses round(mask_probability * maskable) of them. The result is
    ceil(mask_probability * block_length) + 1, rounded up to a multiple of 8 so that the slot
    axis tiles well on accelerators. For 4096 tokens and 0.15 it is 616.

    Args:
        block_length: Tokens per row, special tokens included.
        mask_probability: Fraction of maskable tokens chosen for prediction.

    Returns:
        The number of prediction slots per row.

    Raises:
        ValueError: If `block_length` is not a positive integer or `mask_probability` is not in
            (0, 1].
    """
    if not isinstance(block_length, int) or block_length < 1:
        raise ValueError(f"block_length must be a positive integer; got {block_length!r}.")
    _check_probability(mask_probability)
    slots = math.ceil(mask_probability * block_length) + 1
    return 8 * math.ceil(slots / 8)


def _non_special_ids(
    vocab_size: int, special_token_ids: Sequence[int], mask_token_id: int
) -> tuple[np.ndarray, int]:
    """Return the sorted excluded ids and how many ids of the vocabulary remain."""
    excluded = np.array(
        sorted({int(i) for i in special_token_ids} | {mask_token_id}), dtype=np.int64
    )
    excluded = excluded[(excluded >= 0) & (excluded < vocab_size)]
    return excluded, vocab_size - len(excluded)


def _nth_allowed_id(ranks: np.ndarray, excluded: np.ndarray) -> np.ndarray:
    """Map ranks among the non-excluded ids to the ids themselves.

    `excluded[j] - j` counts the allowed ids below `excluded[j]`, so the allowed id of rank r is
    r plus the number of excluded ids whose count is at most r.
    """
    allowed_below = excluded - np.arange(len(excluded))
    return ranks + np.searchsorted(allowed_below, ranks, side="right")


def _check_mask_arguments(
    input_ids: np.ndarray,
    arrays: dict[str, np.ndarray | None],
    *,
    seed: int,
    step: int,
    mask_token_id: int,
    vocab_size: int,
    mask_probability: float,
    max_predictions: int,
) -> None:
    if input_ids.ndim != 2:
        raise ValueError(
            f"input_ids must be a 2-D array (batch, length); got shape {input_ids.shape}."
        )
    for name, values in arrays.items():
        if values is not None and values.shape != input_ids.shape:
            raise ValueError(
                f"{name} has shape {values.shape} but input_ids has shape {input_ids.shape}; "
                "pass arrays from the same batch."
            )
    for name, value in (("seed", seed), ("step", step)):
        if not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer; got {value!r}.")
    _check_probability(mask_probability)
    if not isinstance(max_predictions, (int, np.integer)) or max_predictions < 1:
        raise ValueError(
            f"max_predictions must be a positive integer; got {max_predictions!r}. Use "
            "default_max_predictions(block_length, mask_probability)."
        )
    if not 0 <= mask_token_id < vocab_size:
        raise ValueError(
            f"mask_token_id {mask_token_id} is outside the vocabulary [0, {vocab_size}); pass the "
            "tokenizer's mask_token_id and the model's vocab_size."
        )
    if input_ids.size and (input_ids.min() < 0 or input_ids.max() >= vocab_size):
        raise ValueError(
            f"input_ids contains ids in [{input_ids.min()}, {input_ids.max()}], outside the "
            f"vocabulary [0, {vocab_size}); pass the model's vocab_size and blocks built with "
            "its tokenizer."
        )


def mask_tokens(
    input_ids: np.ndarray,
    special_tokens_mask: np.ndarray,
    *,
    seed: int,
    step: int,
    mask_token_id: int,
    vocab_size: int,
    special_token_ids: Sequence[int],
    max_predictions: int,
    mask_probability: float = 0.15,
    attention_mask: np.ndarray | None = None,
    char_counts: np.ndarray | None = None,
    byte_counts: np.ndarray | None = None,
) -> MaskedBatch:
    """Choose prediction positions and corrupt the inputs, reproducibly from (seed, step, row).

    Row `r` draws from `np.random.default_rng([seed, step, r])`, so its masking depends only on
    the seed, the step, the row index and the row's own tokens: the same call gives the same
    batch, and evaluation with a fixed seed and step per batch gets the same masking on every run.

    A row's maskable tokens are those with `special_tokens_mask` 0 and `attention_mask` 1. The row
    gets round(mask_probability * maskable) predictions (halves round up), at most
    `max_predictions`, at positions drawn without replacement. Each chosen position becomes
    `mask_token_id` with probability 0.8, a random id with probability 0.1 and stays unchanged
    otherwise (drawn independently per position). Random ids are drawn uniformly from
    [0, vocab_size) without `special_token_ids` and `mask_token_id`.

    Args:
        input_ids: (B, L) integer token ids.
        special_tokens_mask: (B, L), nonzero at special tokens and padding.
        seed: Non-negative seed of the run (or of the evaluation).
        step: Non-negative training step, or the batch index during evaluation.
        mask_token_id: Id of the mask token.
        vocab_size: Size of the model's vocabulary; all ids must be below it.
        special_token_ids: Ids never used as random replacements, for example the tokenizer's
            `all_special_ids`.
        max_predictions: Prediction slots per row (P); see `default_max_predictions`.
        mask_probability: Fraction of maskable tokens chosen for prediction.
        attention_mask: (B, L), 0 at padding; None means no padding beyond `special_tokens_mask`.
        char_counts: (B, L) characters of text per token; None gives zero counts.
        byte_counts: (B, L) UTF-8 bytes of text per token; None gives zero counts.

    Returns:
        The masked batch; `num_capped_rows` counts the rows cut to `max_predictions`.

    Raises:
        ValueError: If shapes disagree, ids are outside the vocabulary, `seed`, `step`,
            `max_predictions` or `mask_probability` is invalid, or every vocabulary id is special.
    """
    input_ids = np.asarray(input_ids)
    special_tokens_mask = np.asarray(special_tokens_mask)
    optional = {
        "attention_mask": attention_mask,
        "char_counts": char_counts,
        "byte_counts": byte_counts,
    }
    optional = {
        name: None if value is None else np.asarray(value) for name, value in optional.items()
    }
    _check_mask_arguments(
        input_ids,
        {"special_tokens_mask": special_tokens_mask, **optional},
        seed=seed,
        step=step,
        mask_token_id=mask_token_id,
        vocab_size=vocab_size,
        mask_probability=mask_probability,
        max_predictions=max_predictions,
    )
    excluded, num_allowed = _non_special_ids(vocab_size, special_token_ids, mask_token_id)
    if num_allowed < 1:
        raise ValueError(
            f"Every id of the vocabulary of {vocab_size} is special or the mask token, so no "
            "random replacement can be drawn; check vocab_size and special_token_ids."
        )

    batch_size, _ = input_ids.shape
    zeros = np.zeros_like(input_ids, dtype=np.int32)
    attention = zeros + 1 if optional["attention_mask"] is None else optional["attention_mask"]
    chars = zeros if optional["char_counts"] is None else optional["char_counts"]
    num_bytes = zeros if optional["byte_counts"] is None else optional["byte_counts"]
    maskable = (special_tokens_mask == 0) & (attention != 0)

    wanted = _num_predictions(maskable.sum(axis=1), mask_probability)
    counts = np.minimum(wanted, max_predictions)
    corrupted = input_ids.astype(np.int32, copy=True)
    positions = np.zeros((batch_size, max_predictions), dtype=np.int32)
    labels = np.zeros((batch_size, max_predictions), dtype=np.int32)
    weights = np.zeros((batch_size, max_predictions), dtype=np.float32)
    masked_chars = np.zeros((batch_size, max_predictions), dtype=np.int32)
    masked_bytes = np.zeros((batch_size, max_predictions), dtype=np.int32)

    for row in range(batch_size):
        count = int(counts[row])
        if count == 0:
            continue
        rng = np.random.default_rng([int(seed), int(step), row])
        candidates = np.flatnonzero(maskable[row])
        chosen = np.sort(rng.choice(candidates, size=count, replace=False))
        action = rng.random(count)
        random_ids = _nth_allowed_id(rng.integers(0, num_allowed, size=count), excluded)

        positions[row, :count] = chosen
        labels[row, :count] = input_ids[row, chosen]
        weights[row, :count] = 1.0
        masked_chars[row, :count] = chars[row, chosen]
        masked_bytes[row, :count] = num_bytes[row, chosen]

        use_mask = action < MASK_TOKEN_FRACTION
        use_random = ~use_mask & (action < MASK_TOKEN_FRACTION + RANDOM_TOKEN_FRACTION)
        corrupted[row, chosen[use_mask]] = mask_token_id
        corrupted[row, chosen[use_random]] = random_ids[use_random]

    return MaskedBatch(
        input_ids=corrupted,
        attention_mask=np.asarray(attention, dtype=np.int32),
        masked_positions=positions,
        masked_labels=labels,
        masked_weights=weights,
        masked_char_counts=masked_chars,
        masked_byte_counts=masked_bytes,
        num_capped_rows=int(np.sum(wanted > max_predictions)),
    )


def mlm_loss(
    logits: jax.Array, labels: jax.Array, weights: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Compute the summed negative log-likelihood of the labels, in float32.

    Logits of any float dtype (bf16 included) are cast to float32 before the softmax. Slots with
    weight 0 contribute nothing, even when their logits are not finite.

    Args:
        logits: (B, P, V) vocabulary logits at the masked positions.
        labels: (B, P) integer target ids.
        weights: (B, P) slot weights, 0 for unused slots.

    Returns:
        (sum_nll, num_tokens): the weighted sum of the NLL in nats and the sum of the weights,
        both float32 scalars. The mean loss is sum_nll / num_tokens.

    Raises:
        ValueError: If the shapes of logits, labels and weights disagree.
    """
    logits, labels, weights = jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights)
    if logits.ndim != labels.ndim + 1 or logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits shape {logits.shape} does not match labels shape {labels.shape}; logits "
            "must be labels.shape + (vocab_size,)."
        )
    if weights.shape != labels.shape:
        raise ValueError(
            f"weights shape {weights.shape} does not match labels shape {labels.shape}."
        )
    return _weighted_nll(logits, labels, weights)


# Jitted so that an eager call (an evaluation loop outside jit) compiles once per shape instead
# of once per operation. Inside a jitted step it is inlined.
@jax.jit
def _weighted_nll(
    logits: jax.Array, labels: jax.Array, weights: jax.Array
) -> tuple[jax.Array, jax.Array]:
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    weights = weights.astype(jnp.float32)
    nll = jnp.where(weights > 0, nll, 0.0)
    return jnp.sum(nll * weights), jnp.sum(weights)


@dataclasses.dataclass
class LMMetrics:
    """Accumulates masked-LM loss over batches and reports corpus-level figures.

    All totals are sums over masked tokens, so `loss` is weighted by tokens across batches and is
    never a mean of per-batch means.

    Attributes:
        sum_nll: Summed negative log-likelihood in nats.
        num_tokens: Masked tokens.
        num_characters: Characters of text covered by the masked tokens.
        num_bytes: UTF-8 bytes of text covered by the masked tokens.
    """

    sum_nll: float = 0.0
    num_tokens: float = 0.0
    num_characters: float = 0.0
    num_bytes: float = 0.0

    def update(
        self,
        sum_nll: float | jax.Array,
        num_tokens: float | jax.Array,
        *,
        num_characters: float | jax.Array = 0,
        num_bytes: float | jax.Array = 0,
    ) -> None:
        """Add one batch.

        Pass the character and byte counts for every batch or for none: the per-character and
        per-byte figures divide the total NLL by the totals of these counts.

        Args:
            sum_nll: Summed NLL of the batch in nats, for example from `mlm_loss`.
            num_tokens: Masked tokens in the batch.
            num_characters: Characters covered by those tokens, for example
                `(batch.masked_char_counts * batch.masked_weights).sum()`.
            num_bytes: UTF-8 bytes covered by those tokens.

        Raises:
            ValueError: If a value is negative or not finite.
        """
        values = {
            "sum_nll": float(sum_nll),
            "num_tokens": float(num_tokens),
            "num_characters": float(num_characters),
            "num_bytes": float(num_bytes),
        }
        for name, value in values.items():
            if not math.isfinite(value) or value < 0:
                raise ValueError(
                    f"LMMetrics.update got {name}={value}; it must be finite and non-negative "
                    "(a NaN or infinite loss points at a diverged model)."
                )
        self.sum_nll += values["sum_nll"]
        self.num_tokens += values["num_tokens"]
        self.num_characters += values["num_characters"]
        self.num_bytes += values["num_bytes"]

    def merge(self, other: LMMetrics) -> LMMetrics:
        """Return the metrics of both accumulators together (for example from two processes)."""
        return LMMetrics(
            sum_nll=self.sum_nll + other.sum_nll,
            num_tokens=self.num_tokens + other.num_tokens,
            num_characters=self.num_characters + other.num_characters,
            num_bytes=self.num_bytes + other.num_bytes,
        )

    def compute(self) -> dict[str, float]:
        """Compute the figures over everything accumulated.

        Returns:
            A dict with:

            * `loss`: mean NLL per masked token, in nats.
            * `perplexity`: exp(loss).
            * `bits_per_token`: loss / ln 2, bits per masked subword token. Longformer-style
              papers report this figure under the name "bpc", but it is per subword token, not
              per character.
            * `bits_per_character`: total NLL in bits divided by the characters covered by the
              masked tokens; NaN when no character counts were passed.
            * `bits_per_byte`: the same with UTF-8 bytes; it differs from `bits_per_character`
              for non-ASCII text. NaN when no byte counts were passed.
            * `num_tokens`, `num_characters`, `num_bytes`: the totals.

        Raises:
            RuntimeError: If no masked token has been accumulated.
        """
        if self.num_tokens <= 0:
            raise RuntimeError(
                "LMMetrics.compute() called before any masked token was accumulated; call "
                "update() with at least one batch that has masked tokens."
            )
        total_bits = self.sum_nll / math.log(2)
        loss = self.sum_nll / self.num_tokens
        return {
            "loss": loss,
            "perplexity": math.exp(loss) if loss < 700 else math.inf,
            "bits_per_token": loss / math.log(2),
            "bits_per_character": total_bits / self.num_characters
            if self.num_characters > 0
            else math.nan,
            "bits_per_byte": total_bits / self.num_bytes if self.num_bytes > 0 else math.nan,
            "num_tokens": self.num_tokens,
            "num_characters": self.num_characters,
            "num_bytes": self.num_bytes,
        }
