"""Tests for longflax.tasks.mlm: dynamic masking, the masked-LM loss and corpus metrics."""

import gzip
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from longflax.data import text
from longflax.tasks import mlm

# A small vocabulary laid out like RoBERTa's: <s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4.
CLS, PAD, SEP, UNK, MASK = 0, 1, 2, 3, 4
SPECIAL_IDS = (CLS, PAD, SEP, UNK, MASK)
VOCAB_SIZE = 1000


def make_rows(num_rows: int, length: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Return (input_ids, special_tokens_mask, attention_mask) for rows of varying padding.

    Row r contains <s>, text, </s> and then padding; every fifth row also has a separator inside.
    """
    rng = np.random.default_rng(seed)
    ids = np.full((num_rows, length), PAD, dtype=np.int32)
    for row in range(num_rows):
        used = int(rng.integers(length // 4, length + 1))
        ids[row, :used] = rng.integers(len(SPECIAL_IDS), VOCAB_SIZE, size=used)
        ids[row, 0] = CLS
        ids[row, used - 1] = SEP
        if row % 5 == 0:
            ids[row, used // 2] = SEP
    special = np.isin(ids, SPECIAL_IDS).astype(np.int8)
    attention = (ids != PAD).astype(np.int32)
    return ids, special, attention


def mask(ids, special, **kwargs) -> mlm.MaskedBatch:
    arguments = {
        "seed": 0,
        "step": 0,
        "mask_token_id": MASK,
        "vocab_size": VOCAB_SIZE,
        "special_token_ids": SPECIAL_IDS,
    }
    arguments.update(kwargs)
    if "max_predictions" not in arguments:
        arguments["max_predictions"] = mlm.default_max_predictions(ids.shape[-1])
    return mlm.mask_tokens(ids, special, **arguments)


@pytest.fixture(scope="module")
def roberta_tokenizer(data_dir, tmp_path_factory):
    """Return the roberta-base fast tokenizer built from the stored tokenizer.json."""
    target = tmp_path_factory.mktemp("roberta") / "tokenizer.json"
    with gzip.open(data_dir / "tokenizers/roberta-base/tokenizer.json.gz", "rb") as handle:
        target.write_bytes(handle.read())
    return transformers.RobertaTokenizerFast(tokenizer_file=str(target))


# ---------------------------------------------------------------------------------------------
# LMMetrics
# ---------------------------------------------------------------------------------------------


def test_metrics_token_weighted_across_batches():
    metrics = mlm.LMMetrics()
    metrics.update(10.0, 4, num_characters=16, num_bytes=16)
    metrics.update(2.0, 1, num_characters=4, num_bytes=4)

    result = metrics.compute()

    assert result["loss"] == pytest.approx(2.4)  # 12 / 5, not the mean of batch means 2.25
    assert result["loss"] != pytest.approx(2.25)
    assert result["perplexity"] == pytest.approx(11.0232, abs=1e-4)
    assert result["bits_per_token"] == pytest.approx(3.4625, abs=1e-4)
    assert result["bits_per_character"] == pytest.approx(0.8656, abs=1e-4)  # 12 / ln 2 / 20
    assert result["bits_per_byte"] == pytest.approx(0.8656, abs=1e-4)
    assert result["num_tokens"] == 5
    assert result["num_characters"] == 20


def test_metrics_bytes_differ_from_characters():
    metrics = mlm.LMMetrics()
    # 20 characters of German text with umlauts take 26 UTF-8 bytes.
    metrics.update(12.0, 5, num_characters=20, num_bytes=26)

    result = metrics.compute()

    assert result["bits_per_character"] == pytest.approx(12 / math.log(2) / 20)
    assert result["bits_per_byte"] == pytest.approx(12 / math.log(2) / 26)
    assert result["bits_per_byte"] < result["bits_per_character"]


def test_metrics_without_character_counts():
    metrics = mlm.LMMetrics()
    metrics.update(jnp.float32(3.0), jnp.float32(2.0))

    result = metrics.compute()

    assert result["loss"] == pytest.approx(1.5)
    assert math.isnan(result["bits_per_character"])
    assert math.isnan(result["bits_per_byte"])


def test_metrics_merge_equals_single_accumulator():
    first, second, together = mlm.LMMetrics(), mlm.LMMetrics(), mlm.LMMetrics()
    first.update(10.0, 4, num_characters=16, num_bytes=17)
    second.update(2.0, 1, num_characters=4, num_bytes=5)
    together.update(10.0, 4, num_characters=16, num_bytes=17)
    together.update(2.0, 1, num_characters=4, num_bytes=5)

    assert first.merge(second).compute() == together.compute()


def test_metrics_reject_empty_and_invalid():
    metrics = mlm.LMMetrics()

    with pytest.raises(RuntimeError, match=r"compute\(\) called before any masked token"):
        metrics.compute()
    with pytest.raises(ValueError, match="got sum_nll=nan; it must be finite and non-negative"):
        metrics.update(float("nan"), 3)
    with pytest.raises(ValueError, match="got num_tokens=-1.0; it must be finite"):
        metrics.update(1.0, -1)


# ---------------------------------------------------------------------------------------------
# mlm_loss
# ---------------------------------------------------------------------------------------------


def reference_loss(logits: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> float:
    logits = logits.astype(np.float64)
    log_norm = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1))
    log_probs = logits - logits.max(-1, keepdims=True) - log_norm[..., None]
    picked = np.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
    return float(-np.sum(picked * weights))


def test_mlm_loss_matches_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 7)).astype(np.float32) * 3
    labels = rng.integers(0, 7, size=(2, 3))
    weights = np.array([[1, 1, 0], [1, 0, 0]], dtype=np.float32)

    sum_nll, num_tokens = jax.jit(mlm.mlm_loss)(logits, labels, weights)

    assert sum_nll.dtype == jnp.float32
    assert float(sum_nll) == pytest.approx(reference_loss(logits, labels, weights), rel=1e-6)
    assert float(num_tokens) == 3.0


def test_mlm_loss_bf16_logits_in_float32():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(4, 8, 8192)) * 4, dtype=jnp.bfloat16)
    labels = rng.integers(0, 8192, size=(4, 8))
    weights = np.ones((4, 8), dtype=np.float32)

    sum_nll, num_tokens = mlm.mlm_loss(logits, labels, weights)

    expected = reference_loss(np.asarray(logits.astype(jnp.float32)), labels, weights)
    assert sum_nll.dtype == jnp.float32
    assert num_tokens.dtype == jnp.float32
    assert float(sum_nll) == pytest.approx(expected, rel=1e-5)


def test_mlm_loss_ignores_unused_slots():
    logits = np.zeros((1, 2, 5), dtype=np.float32)
    logits[0, 1] = np.nan
    labels = np.array([[3, 0]])
    weights = np.array([[1.0, 0.0]], dtype=np.float32)

    sum_nll, num_tokens = mlm.mlm_loss(logits, labels, weights)

    assert float(sum_nll) == pytest.approx(math.log(5))
    assert float(num_tokens) == 1.0


def test_mlm_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"logits shape \(2, 3\) does not match labels shape"):
        mlm.mlm_loss(np.zeros((2, 3)), np.zeros((2, 3), dtype=np.int32), np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"weights shape \(2,\) does not match labels shape"):
        mlm.mlm_loss(np.zeros((2, 3, 5)), np.zeros((2, 3), dtype=np.int32), np.zeros(2))


# ---------------------------------------------------------------------------------------------
# default_max_predictions
# ---------------------------------------------------------------------------------------------


def test_default_max_predictions_values():
    assert mlm.default_max_predictions(4096) == 616
    assert mlm.default_max_predictions(512) == 80
    assert mlm.default_max_predictions(4096, 0.3) % 8 == 0


@pytest.mark.parametrize("probability", [0.05, 0.15, 0.3, 0.5, 1.0])
def test_default_max_predictions_never_caps_full_row(probability):
    for length in [3, 4, 7, 16, 100, 511, 512, 4096]:
        slots = mlm.default_max_predictions(length, probability)
        ids = np.full((1, length), 10, dtype=np.int32)
        special = np.zeros_like(ids)

        batch = mask(ids, special, mask_probability=probability, max_predictions=slots)

        assert batch.num_capped_rows == 0


def test_default_max_predictions_rejects_bad_arguments():
    with pytest.raises(ValueError, match="block_length must be a positive integer; got 0"):
        mlm.default_max_predictions(0)
    with pytest.raises(ValueError, match=r"mask_probability must be in \(0, 1\]; got 0.0"):
        mlm.default_max_predictions(512, 0.0)


# ---------------------------------------------------------------------------------------------
# mask_tokens
# ---------------------------------------------------------------------------------------------


def test_masking_same_seed_identical():
    ids, special, attention = make_rows(8, 64)

    first = mask(ids, special, seed=3, step=5, attention_mask=attention)
    second = mask(ids, special, seed=3, step=5, attention_mask=attention)
    next_step = mask(ids, special, seed=3, step=6, attention_mask=attention)
    other_seed = mask(ids, special, seed=4, step=5, attention_mask=attention)

    for name in ("input_ids", "masked_positions", "masked_labels", "masked_weights"):
        assert np.array_equal(getattr(first, name), getattr(second, name))
    assert not np.array_equal(first.masked_positions, next_step.masked_positions)
    assert not np.array_equal(first.masked_positions, other_seed.masked_positions)


def test_masking_row_depends_only_on_its_index():
    ids, special, attention = make_rows(3, 64)
    other_ids, other_special, other_attention = make_rows(3, 64, seed=9)
    mixed_ids = np.stack([ids[0], other_ids[1], other_ids[2]])
    mixed_special = np.stack([special[0], other_special[1], other_special[2]])
    mixed_attention = np.stack([attention[0], other_attention[1], other_attention[2]])

    alone = mask(ids, special, attention_mask=attention)
    mixed = mask(mixed_ids, mixed_special, attention_mask=mixed_attention)

    assert np.array_equal(alone.masked_positions[0], mixed.masked_positions[0])
    assert np.array_equal(alone.input_ids[0], mixed.input_ids[0])


def test_masking_statistics_large_batch():
    ids, special, attention = make_rows(256, 512)

    batch = mask(ids, special, seed=7, step=0, attention_mask=attention)

    maskable = (special == 0) & (attention == 1)
    counts = batch.masked_weights.sum(axis=1).astype(np.int64)
    expected = np.floor(0.15 * maskable.sum(axis=1) + 0.5)
    assert np.array_equal(counts, expected)
    assert counts.sum() / maskable.sum() == pytest.approx(0.15, abs=0.002)
    assert batch.num_capped_rows == 0

    rows, slots = np.nonzero(batch.masked_weights)
    positions = batch.masked_positions[rows, slots]
    # Chosen positions are maskable, distinct and ascending within each row.
    assert np.all(maskable[rows, positions])
    for row in range(len(ids)):
        used = batch.masked_positions[row, : counts[row]]
        assert np.all(np.diff(used) > 0)
    assert np.array_equal(batch.masked_labels[rows, slots], ids[rows, positions])

    new_ids = batch.input_ids[rows, positions]
    labels = batch.masked_labels[rows, slots]
    masked = np.mean(new_ids == MASK)
    unchanged = np.mean(new_ids == labels)
    replaced = np.mean((new_ids != MASK) & (new_ids != labels))
    assert masked == pytest.approx(0.8, abs=0.02)
    assert unchanged == pytest.approx(0.1, abs=0.02)
    assert replaced == pytest.approx(0.1, abs=0.02)

    # Special tokens, padding and every position not chosen are left as they were.
    chosen = np.zeros_like(maskable)
    chosen[rows, positions] = True
    assert np.array_equal(batch.input_ids[~chosen], ids[~chosen])
    assert np.array_equal(batch.attention_mask, attention)
    assert np.all(batch.masked_positions[batch.masked_weights == 0] == 0)
    assert np.all(batch.masked_labels[batch.masked_weights == 0] == 0)


def test_random_replacements_never_special():
    # With 12 ids and 5 special ones, a draw that ignored the exclusion would hit a special id
    # in about 40% of the replacements.
    vocab_size = 12
    ids = np.full((64, 200), 7, dtype=np.int32)
    special = np.zeros_like(ids)

    batch = mask(ids, special, vocab_size=vocab_size, mask_probability=1.0, max_predictions=200)

    replaced = batch.input_ids[(batch.input_ids != MASK) & (batch.input_ids != 7)]
    assert len(replaced) > 500
    assert not np.any(np.isin(replaced, SPECIAL_IDS))
    assert set(replaced.tolist()) == {5, 6, 8, 9, 10, 11}


def test_masking_caps_rows_at_max_predictions():
    ids, special, attention = make_rows(6, 128)

    batch = mask(ids, special, attention_mask=attention, mask_probability=0.5, max_predictions=8)

    assert batch.masked_positions.shape == (6, 8)
    assert batch.num_capped_rows == 6
    assert np.all(batch.masked_weights == 1.0)


def test_masking_row_without_maskable_tokens():
    ids = np.array([[CLS, SEP, PAD, PAD], [CLS, 10, 11, SEP]], dtype=np.int32)
    special = np.isin(ids, SPECIAL_IDS)

    batch = mask(ids, special, mask_probability=0.5, max_predictions=4)

    assert np.all(batch.masked_weights[0] == 0)
    assert batch.masked_weights[1].sum() == 1
    assert np.array_equal(batch.input_ids[0], ids[0])


def test_masking_output_dtypes_and_counts():
    ids, special, attention = make_rows(4, 32)
    chars = np.where(special == 0, 3, 0)
    num_bytes = np.where(special == 0, 4, 0)

    batch = mask(ids, special, attention_mask=attention, char_counts=chars, byte_counts=num_bytes)

    assert batch.input_ids.dtype == np.int32
    assert batch.attention_mask.dtype == np.int32
    assert batch.masked_positions.dtype == np.int32
    assert batch.masked_labels.dtype == np.int32
    assert batch.masked_weights.dtype == np.float32
    assert np.array_equal(batch.masked_char_counts, 3 * batch.masked_weights.astype(np.int32))
    assert np.array_equal(batch.masked_byte_counts, 4 * batch.masked_weights.astype(np.int32))


def test_masking_rejects_bad_arguments():
    ids = np.full((2, 4), 10, dtype=np.int32)
    special = np.zeros_like(ids)

    with pytest.raises(ValueError, match=r"input_ids must be a 2-D array \(batch, length\)"):
        mask(ids[0], special[0], max_predictions=2)
    with pytest.raises(ValueError, match=r"special_tokens_mask has shape \(2, 3\) but input_ids"):
        mask(ids, special[:, :3])
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 3\) but input_ids"):
        mask(ids, special, attention_mask=special[:, :3])
    with pytest.raises(ValueError, match=r"char_counts has shape \(1, 4\) but input_ids"):
        mask(ids, special, char_counts=special[:1])
    with pytest.raises(ValueError, match="seed must be a non-negative integer; got -1"):
        mask(ids, special, seed=-1)
    with pytest.raises(ValueError, match="step must be a non-negative integer; got -2"):
        mask(ids, special, step=-2)
    with pytest.raises(ValueError, match=r"mask_probability must be in \(0, 1\]; got 1.5"):
        mask(ids, special, mask_probability=1.5)
    with pytest.raises(ValueError, match="max_predictions must be a positive integer; got 0"):
        mask(ids, special, max_predictions=0)
    with pytest.raises(
        ValueError, match=r"mask_token_id 1000 is outside the vocabulary \[0, 1000\)"
    ):
        mask(ids, special, mask_token_id=1000)
    with pytest.raises(ValueError, match=r"input_ids contains ids in \[10, 1500\], outside"):
        mask(np.array([[10, 1500]]), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="Every id of the vocabulary of 5 is special"):
        mask(np.array([[1, 2]]), np.zeros((1, 2)), vocab_size=5)


# ---------------------------------------------------------------------------------------------
# Masking real text blocks
# ---------------------------------------------------------------------------------------------


@jax.jit
def score_slots(table, projection, inputs, labels, weights):
    """Score each prediction slot from its (masked) input token with a fixed random model."""
    return mlm.mlm_loss(table[inputs] @ projection, labels, weights)


def evaluate_fixed_model(batches: list[text.BlockBatch], tokenizer, seed: int) -> dict:
    """Return the metrics of a fixed random model under evaluation masking with `seed`."""
    weights_rng = np.random.default_rng(0)
    table = weights_rng.normal(size=(len(tokenizer), 8)).astype(np.float32)
    projection = weights_rng.normal(size=(8, len(tokenizer))).astype(np.float32)
    metrics = mlm.LMMetrics()
    for step, batch in enumerate(batches):
        masked = mlm.mask_tokens(
            batch.input_ids,
            batch.special_tokens_mask,
            seed=seed,
            step=step,
            mask_token_id=tokenizer.mask_token_id,
            vocab_size=len(tokenizer),
            special_token_ids=tokenizer.all_special_ids,
            max_predictions=mlm.default_max_predictions(batch.input_ids.shape[1]),
            attention_mask=batch.attention_mask,
            char_counts=batch.char_counts,
            byte_counts=batch.byte_counts,
        )
        inputs = np.take_along_axis(masked.input_ids, masked.masked_positions, axis=1)
        sum_nll, num_tokens = score_slots(
            table, projection, inputs, masked.masked_labels, masked.masked_weights
        )
        weights = masked.masked_weights
        metrics.update(
            sum_nll,
            num_tokens,
            num_characters=float(np.sum(masked.masked_char_counts * weights)),
            num_bytes=float(np.sum(masked.masked_byte_counts * weights)),
        )
    return metrics.compute()


def test_evaluation_masking_reproducible(data_dir, roberta_tokenizer):
    documents = text.read_documents(data_dir / "text/gutenberg/pg84.txt", layout="paragraphs")
    blocks = text.build_blocks(
        list(documents)[:40], roberta_tokenizer, 64, show_progress=False, pad_last_block=True
    )
    iterator = text.BlockIterator(
        blocks, 4, seed=0, shuffle=False, drop_remainder=False, num_epochs=1
    )
    batches = list(iterator)
    assert len(batches) == -(-len(blocks) // 4)

    first = evaluate_fixed_model(batches, roberta_tokenizer, seed=123)
    second = evaluate_fixed_model(batches, roberta_tokenizer, seed=123)
    other = evaluate_fixed_model(batches, roberta_tokenizer, seed=124)

    assert first == second
    assert first["loss"] != other["loss"]
    assert first["num_characters"] > first["num_tokens"]


def test_masked_counts_of_non_ascii_text(roberta_tokenizer):
    documents = [
        "Gr\u00fc\u00dfe aus K\u00f6ln, sch\u00f6ne Stra\u00dfe und na\u00efve Caf\u00e9s."
    ]
    blocks = text.build_blocks(documents, roberta_tokenizer, 64, pad_last_block=True)

    # With probability 1 every text token is predicted, so the masked counts cover all text.
    batch = mlm.mask_tokens(
        blocks.input_ids,
        blocks.special_tokens_mask,
        seed=0,
        step=0,
        mask_token_id=roberta_tokenizer.mask_token_id,
        vocab_size=len(roberta_tokenizer),
        special_token_ids=roberta_tokenizer.all_special_ids,
        max_predictions=64,
        mask_probability=1.0,
        attention_mask=blocks.attention_mask,
        char_counts=blocks.char_counts,
        byte_counts=blocks.byte_counts,
    )

    weights = batch.masked_weights
    assert np.sum(batch.masked_char_counts * weights) == len(documents[0])
    assert np.sum(batch.masked_byte_counts * weights) == len(documents[0].encode())
    assert len(documents[0].encode()) > len(documents[0])
