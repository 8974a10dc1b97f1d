"""Post-LayerNorm Transformer encoder of the BERT family, with full or Longformer attention.

One module serves BERT, RoBERTa, XLM-R and their long (Longformer-style) conversions; the
settings in `ModelConfig` select position numbering, attention kind and window per layer.
"""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from longflax.modeling import attention as attn
from longflax.modeling.config import ModelConfig
from longflax.modeling.layers import Dense, Embed, LayerNorm, activation, dropout
from longflax.sharding import constrain

# Long inputs are padded to a multiple of min(largest window, PAD_MULTIPLE) tokens.
PAD_MULTIPLE = 128

# Logical axes of the hidden states between layers.
ACTIVATION_AXES = ("batch", "length", "embed")


@flax.struct.dataclass
class EncoderOutput:
    last_hidden_state: Float[Array, "B T D"]
    hidden_states: tuple[Array, ...] | None = None
    pooler_output: Float[Array, "B D"] | None = None


@flax.struct.dataclass
class MaskedLMOutput:
    logits: Float[Array, "B P V"]
    last_hidden_state: Float[Array, "B T D"]
    hidden_states: tuple[Array, ...] | None = None


@flax.struct.dataclass
class QuestionAnsweringOutput:
    start_logits: Float[Array, "B T"]
    end_logits: Float[Array, "B T"]
    last_hidden_state: Float[Array, "B T D"]
    hidden_states: tuple[Array, ...] | None = None


def _compute_dtype(config: ModelConfig) -> jnp.dtype:
    return jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32


def _is_concrete(*arrays: Any) -> bool:
    return all(a is None or not isinstance(a, jax.core.Tracer) for a in arrays)


def position_ids_from_input_ids(input_ids: Int[Array, "B T"], config: ModelConfig) -> Int[Array, "B T"]:
    """Number the tokens the way the source family does.

    RoBERTa-style models derive positions from `input_ids`: real tokens get
    `pad_token_id + 1, pad_token_id + 2, ...` (counting only non-padding tokens) and padding
    tokens get `pad_token_id`. BERT numbers every position 0..T-1.
    """
    if config.position_scheme == "absolute":
        return jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
    is_token = (input_ids != config.pad_token_id).astype(jnp.int32)
    return (jnp.cumsum(is_token, axis=1) * is_token + config.pad_token_id).astype(jnp.int32)


def default_qa_global_mask(input_ids: Int[Array, "B T"], config: ModelConfig) -> Int[Array, "B T"]:
    """Global attention on the first token and the question: every position before the first separator.

    This is the Hugging Face Longformer rule for `<s> question </s></s> context </s>` inputs,
    except that any number of separators is accepted. A row without a separator gets global
    attention on its first token only.
    """
    is_sep = input_ids == config.sep_token_id
    has_sep = jnp.any(is_sep, axis=1, keepdims=True)
    first_sep = jnp.where(has_sep, jnp.argmax(is_sep, axis=1)[:, None], 1)
    return (jnp.arange(input_ids.shape[1])[None, :] < first_sep).astype(jnp.int32)


def check_length(config: ModelConfig, length: int) -> None:
    """Reject a sequence longer than the position table can number.

    Raises:
        ValueError: naming the length and the limit.
    """
    if length > config.max_sequence_length:
        raise ValueError(
            f"Input length {length} exceeds the maximum of {config.max_sequence_length} tokens "
            f"(max_position_embeddings={config.max_position_embeddings}); truncate the input or "
            "convert the model to a longer length."
        )


def validate_inputs(
    config: ModelConfig,
    input_ids: Any,
    attention_mask: Any = None,
    global_attention_mask: Any = None,
    token_type_ids: Any = None,
) -> None:
    """Check model inputs on the host, before any compute.

    XLA clamps out-of-range gathers instead of failing, so a token id past the vocabulary or
    a sequence past the position table would silently reuse the last row.

    Raises:
        ValueError: naming the offending value and the limit.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must have shape (batch, length); got shape {ids.shape}.")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integers; got dtype {ids.dtype}.")
    if ids.size and (ids.min() < 0 or ids.max() >= config.vocab_size):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise ValueError(
            f"input_ids contain {bad}, outside the vocabulary [0, {config.vocab_size}); check that "
            "the tokenizer matches the model."
        )
    check_length(config, ids.shape[1])
    for name, value in (
        ("attention_mask", attention_mask),
        ("global_attention_mask", global_attention_mask),
        ("token_type_ids", token_type_ids),
    ):
        if value is not None and np.shape(value) != ids.shape:
            raise ValueError(f"{name} has shape {np.shape(value)} but input_ids has shape {ids.shape}.")
    for name, value in (("attention_mask", attention_mask), ("global_attention_mask", global_attention_mask)):
        if value is not None and not np.isin(np.asarray(value), (0, 1)).all():
            raise ValueError(
                f"{name} must contain only 0 and 1; got values {sorted(np.unique(value).tolist())[:5]}. "
                "Mark global tokens with 1 in global_attention_mask, not with 2."
            )
    if token_type_ids is not None:
        types = np.asarray(token_type_ids)
        if types.size and (types.min() < 0 or types.max() >= config.type_vocab_size):
            raise ValueError(
                f"token_type_ids contain {int(types.max())}, outside [0, {config.type_vocab_size})."
            )
    if global_attention_mask is not None and config.attention == "longformer":
        effective = np.asarray(global_attention_mask).astype(bool)
        if attention_mask is not None:
            effective &= np.asarray(attention_mask).astype(bool)
        most = int(effective.sum(axis=1).max()) if effective.size else 0
        if most > config.max_global_tokens:
            raise ValueError(
                f"A row has {most} global tokens but the model has max_global_tokens="
                f"{config.max_global_tokens}; raise max_global_tokens or mark fewer tokens global "
                "(for QA, shorten the questions)."
            )


class Embeddings(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        std = config.initializer_range
        dim = config.hidden_size
        self.word_embeddings = Embed(config.vocab_size, dim, axes=("vocab", "embed"), rngs=rngs, init_std=std)
        self.position_embeddings = Embed(
            config.max_position_embeddings, dim, axes=("positions", "embed"), rngs=rngs, init_std=std
        )
        self.token_type_embeddings = Embed(
            config.type_vocab_size, dim, axes=("types", "embed"), rngs=rngs, init_std=std
        )
        self.layer_norm = LayerNorm(dim, eps=config.layer_norm_eps, dtype=_compute_dtype(config))
        self.dropout_rate = config.dropout_rate

    def __call__(self, input_ids, position_ids, token_type_ids, dropout_rng):
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(position_ids)
            + self.token_type_embeddings(token_type_ids)
        )
        return dropout(self.layer_norm(x), self.dropout_rate, dropout_rng)


class SelfAttention(nnx.Module):
    """Multi-head self-attention block with its output projection and post-LayerNorm."""

    def __init__(self, config: ModelConfig, layer_index: int, *, rngs: nnx.Rngs):
        dim, std, dtype = config.hidden_size, config.initializer_range, _compute_dtype(config)

        def projection():
            return Dense(dim, dim, axes=("embed", "heads"), rngs=rngs, init_std=std, dtype=dtype)

        self.query, self.key, self.value = projection(), projection(), projection()
        self.is_long = config.attention == "longformer"
        if self.is_long:
            self.query_global, self.key_global, self.value_global = projection(), projection(), projection()
            self.radius = config.attention_window[layer_index] // 2
        self.output = Dense(dim, dim, axes=("heads", "embed"), rngs=rngs, init_std=std, dtype=dtype)
        self.output_norm = LayerNorm(dim, eps=config.layer_norm_eps, dtype=dtype)
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.dropout_rate = config.dropout_rate
        self.attention_dropout_rate = config.attention_dropout_rate

    def _heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(x.shape[:-1] + (self.num_heads, self.head_dim))

    def __call__(self, x, attention_mask, global_index, global_valid, dropout_rng):
        rngs = [None] * 4 if dropout_rng is None else list(jax.random.split(dropout_rng, 4))
        scale = 1.0 / math.sqrt(self.head_dim)
        # The query is scaled after its bias, before the dot product, as in the reference code.
        q = self._heads(self.query(x) * scale)
        k, v = self._heads(self.key(x)), self._heads(self.value(x))
        if not self.is_long:
            out = attn.full_attention(
                q, k, v, attention_mask, dropout_rate=self.attention_dropout_rate, dropout_rng=rngs[0]
            )
        else:
            out = attn.sliding_window_attention(
                q,
                k,
                v,
                attention_mask,
                radius=self.radius,
                global_index=global_index,
                global_valid=global_valid,
                dropout_rate=self.attention_dropout_rate,
                dropout_rng=rngs[0],
            )
            if global_index is not None:
                hidden_global = attn._take_rows(x, global_index)
                q_global = self._heads(self.query_global(hidden_global) * scale)
                k_global, v_global = self._heads(self.key_global(x)), self._heads(self.value_global(x))
                out_global = attn.global_attention(
                    q_global,
                    k_global,
                    v_global,
                    attention_mask,
                    dropout_rate=self.attention_dropout_rate,
                    dropout_rng=rngs[1],
                )
                out = attn.scatter_global_rows(out, out_global, global_index, global_valid)
        out = out.reshape(out.shape[:2] + (-1,))
        out = dropout(self.output(out), self.dropout_rate, rngs[2])
        return self.output_norm(out + x)


class Layer(nnx.Module):
    """One encoder block: attention, then the feed-forward network, each with post-LayerNorm."""

    def __init__(self, config: ModelConfig, layer_index: int, *, rngs: nnx.Rngs):
        dim, std, dtype = config.hidden_size, config.initializer_range, _compute_dtype(config)
        self.attention = SelfAttention(config, layer_index, rngs=rngs)
        self.intermediate = Dense(dim, config.mlp_dim, axes=("embed", "mlp"), rngs=rngs, init_std=std, dtype=dtype)
        self.output = Dense(config.mlp_dim, dim, axes=("mlp", "embed"), rngs=rngs, init_std=std, dtype=dtype)
        self.output_norm = LayerNorm(dim, eps=config.layer_norm_eps, dtype=dtype)
        self.hidden_act = config.hidden_act
        self.dropout_rate = config.dropout_rate

    def __call__(self, x, attention_mask, global_index, global_valid, dropout_rng):
        attention_rng, output_rng = (None, None) if dropout_rng is None else jax.random.split(dropout_rng)
        x = self.attention(x, attention_mask, global_index, global_valid, attention_rng)

        y = self.output(activation(self.hidden_act)(self.intermediate(x)))
        y = dropout(y, self.dropout_rate, output_rng)
        return self.output_norm(y + x)


def _apply_layer(layer: Layer, x, attention_mask, global_index, global_valid, dropout_rng):
    return layer(x, attention_mask, global_index, global_valid, dropout_rng)


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Encoder(nnx.Module):
    """Embeddings plus the stack of layers; returns `EncoderOutput`."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = Embeddings(config, rngs=rngs)
        self.layers = nnx.List([Layer(config, i, rngs=rngs) for i in range(config.num_layers)])
        if config.add_pooler:
            self.pooler = Dense(
                config.hidden_size,
                config.hidden_size,
                axes=("embed", None),
                rngs=rngs,
                init_std=config.initializer_range,
                dtype=_compute_dtype(config),
            )
        else:
            self.pooler = None

    def __call__(
        self,
        input_ids: Int[Array, "B T"],
        attention_mask: Int[Array, "B T"] | None = None,
        global_attention_mask: Int[Array, "B T"] | None = None,
        token_type_ids: Int[Array, "B T"] | None = None,
        position_ids: Int[Array, "B T"] | None = None,
        *,
        dropout_rng: jax.Array | None = None,
        output_hidden_states: bool = False,
    ) -> EncoderOutput:
        """Encode a batch.

        Args:
          input_ids: token ids.
          attention_mask: 1 at real tokens, 0 at padding; defaults to all ones.
          global_attention_mask: 1 at tokens with global attention (long models only); a
            padding position marked global stays padding.
          token_type_ids: segment ids; defaults to zeros.
          position_ids: explicit position ids; defaults to the family's numbering of input_ids.
          dropout_rng: key for dropout; None runs deterministically (evaluation).
          output_hidden_states: also return the embedding output and every layer's output.

        Returns:
          `EncoderOutput` whose per-token fields have exactly the input length.
        """
        config = self.config
        if _is_concrete(input_ids, attention_mask, global_attention_mask, token_type_ids):
            validate_inputs(config, input_ids, attention_mask, global_attention_mask, token_type_ids)
        else:
            # NOTE: traced values cannot be checked here, so under jax.jit only the length is
            # validated; token ids and global counts are checked when the model runs eagerly.
            check_length(config, jnp.shape(input_ids)[1])
        input_ids = jnp.asarray(input_ids, jnp.int32)
        batch, length = input_ids.shape
        mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
        types = jnp.zeros_like(input_ids) if token_type_ids is None else jnp.asarray(token_type_ids, jnp.int32)
        if position_ids is None:
            position_ids = position_ids_from_input_ids(input_ids, config)
        position_ids = jnp.asarray(position_ids, jnp.int32)

        use_global = config.attention == "longformer" and global_attention_mask is not None
        is_global = None
        if use_global:
            is_global = (jnp.asarray(global_attention_mask) > 0) & (mask > 0)

        # Long models pad to a multiple of the largest window, capped at PAD_MULTIPLE tokens:
        # the blocked kernel needs only a block size that divides the length, and padding a
        # 256-token input to a 512 window would double the work. The padding is masked and cut
        # off again before returning.
        padded = length
        if config.attention == "longformer":
            multiple = min(config.max_window, PAD_MULTIPLE)
            padded = -(-length // multiple) * multiple
        if padded != length:
            extra = ((0, 0), (0, padded - length))
            input_ids = jnp.pad(input_ids, extra, constant_values=config.pad_token_id)
            mask = jnp.pad(mask, extra)
            types = jnp.pad(types, extra)
            position_ids = jnp.pad(position_ids, extra, constant_values=config.pad_token_id)
            if is_global is not None:
                is_global = jnp.pad(is_global, extra)

        global_index = global_valid = None
        if is_global is not None:
            global_index, global_valid = attn.global_slots(
                is_global, min(config.max_global_tokens, padded)
            )

        rngs = [None] * (config.num_layers + 1)
        if dropout_rng is not None:
            rngs = list(jax.random.split(dropout_rng, config.num_layers + 1))
        x = constrain(self.embeddings(input_ids, position_ids, types, rngs[0]), ACTIVATION_AXES)
        bool_mask = mask > 0

        hidden_states = [x] if output_hidden_states else None
        if config.scan_layers and not output_hidden_states:
            x = self._scan_layers(x, bool_mask, global_index, global_valid, rngs[1:])
        else:
            apply = _apply_layer
            if config.remat != "none":
                apply = nnx.remat(_apply_layer, policy=_REMAT_POLICIES[config.remat])
            for layer, rng in zip(self.layers, rngs[1:], strict=True):
                x = constrain(apply(layer, x, bool_mask, global_index, global_valid, rng), ACTIVATION_AXES)
                if hidden_states is not None:
                    hidden_states.append(x)

        x = x[:, :length]
        pooled = None
        if self.pooler is not None:
            pooled = jnp.tanh(self.pooler(x[:, 0]))
        if hidden_states is not None:
            hidden_states = tuple(h[:, :length] for h in hidden_states)
        return EncoderOutput(last_hidden_state=x, hidden_states=hidden_states, pooler_output=pooled)

    def _scan_layers(self, x, mask, global_index, global_valid, rngs):
        """Run the layers with `jax.lax.scan` over stacked parameters (one compiled layer body)."""
        if len(set(self.config.attention_window)) > 1:
            raise ValueError("scan_layers needs the same attention_window in every layer; set scan_layers=False.")
        graphdef, first = nnx.split(self.layers[0])
        states = [nnx.state(layer) for layer in self.layers]
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
        deterministic = rngs[0] is None
        keys = jnp.zeros((len(rngs), 2), jnp.uint32) if deterministic else jnp.stack(rngs)

        def body(carry, inputs):
            state, key = inputs
            layer = nnx.merge(graphdef, state)
            return layer(carry, mask, global_index, global_valid, None if deterministic else key), None

        if self.config.remat != "none":
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[self.config.remat])
        del first
        x, _ = jax.lax.scan(body, x, (stacked, keys))
        return x


class MaskedLMHead(nnx.Module):
    """dense -> GELU -> LayerNorm -> decoder tied to the word embeddings, plus one bias."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        dtype = _compute_dtype(config)
        self.dense = Dense(
            config.hidden_size,
            config.hidden_size,
            axes=("embed", None),
            rngs=rngs,
            init_std=config.initializer_range,
            dtype=dtype,
        )
        self.layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)
        self.bias = nnx.Param(jnp.zeros((config.vocab_size,), jnp.float32), logical_axes=("vocab",))
        self.hidden_act = config.hidden_act
        self.dtype = dtype

    def __call__(self, hidden: jax.Array, word_embeddings: jax.Array) -> jax.Array:
        h = self.layer_norm(activation(self.hidden_act)(self.dense(hidden)))
        logits = jnp.einsum("...D,VD->...V", h, word_embeddings.astype(self.dtype))
        return logits + self.bias[...].astype(self.dtype)


class EncoderForMaskedLM(nnx.Module):
    """Encoder with the masked-LM head; returns `MaskedLMOutput`."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.encoder = Encoder(config, rngs=rngs)
        self.lm_head = MaskedLMHead(config, rngs=rngs)

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        global_attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        *,
        masked_positions: Int[Array, "B P"] | None = None,
        dropout_rng: jax.Array | None = None,
        output_hidden_states: bool = False,
    ) -> MaskedLMOutput:
        """Compute vocabulary logits at every position, or only at `masked_positions`.

        Projecting onto a 250k vocabulary at every one of 4096 positions would take gigabytes,
        so training passes the masked positions and gets logits of shape (B, P, V).
        """
        out = self.encoder(
            input_ids,
            attention_mask,
            global_attention_mask,
            token_type_ids,
            position_ids,
            dropout_rng=dropout_rng,
            output_hidden_states=output_hidden_states,
        )
        hidden = out.last_hidden_state
        if masked_positions is not None:
            hidden = jnp.take_along_axis(hidden, jnp.asarray(masked_positions)[..., None], axis=1)
        logits = self.lm_head(hidden, self.encoder.embeddings.word_embeddings.embedding[...])
        return MaskedLMOutput(
            logits=logits, last_hidden_state=out.last_hidden_state, hidden_states=out.hidden_states
        )


class EncoderForQuestionAnswering(nnx.Module):
    """Encoder with a span head (start and end logits); returns `QuestionAnsweringOutput`."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.encoder = Encoder(config, rngs=rngs)
        self.qa_outputs = Dense(
            config.hidden_size,
            2,
            axes=("embed", "labels"),
            rngs=rngs,
            init_std=config.initializer_range,
            dtype=_compute_dtype(config),
        )

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        global_attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        *,
        dropout_rng: jax.Array | None = None,
        output_hidden_states: bool = False,
    ) -> QuestionAnsweringOutput:
        """Compute start and end logits.

        Long models given no `global_attention_mask` put global attention on the first token
        and on every token before the first separator (the question), as Hugging Face does.
        """
        if global_attention_mask is None and self.config.attention == "longformer":
            global_attention_mask = default_qa_global_mask(jnp.asarray(input_ids), self.config)
            if attention_mask is not None:
                global_attention_mask = global_attention_mask * jnp.asarray(attention_mask)
        out = self.encoder(
            input_ids,
            attention_mask,
            global_attention_mask,
            token_type_ids,
            position_ids,
            dropout_rng=dropout_rng,
            output_hidden_states=output_hidden_states,
        )
        logits = self.qa_outputs(out.last_hidden_state).astype(jnp.float32)
        return QuestionAnsweringOutput(
            start_logits=logits[..., 0],
            end_logits=logits[..., 1],
            last_hidden_state=out.last_hidden_state,
            hidden_states=out.hidden_states,
        )


HEADS = {"none": Encoder, "mlm": EncoderForMaskedLM, "qa": EncoderForQuestionAnswering}


def head_of(model: nnx.Module) -> str:
    """Return the head name ("none", "mlm" or "qa") of a model built by `build_model`."""
    for name, cls in HEADS.items():
        if type(model) is cls:
            return name
    raise ValueError(f"{type(model).__name__} is not a longflax encoder model.")


def build_model(config: ModelConfig, head: str = "none", *, seed: int = 0) -> nnx.Module:
    """Create a randomly initialised model with the given head ("none", "mlm" or "qa")."""
    if head not in HEADS:
        raise ValueError(f"head={head!r} is not supported; use one of {sorted(HEADS)}.")
    return HEADS[head](config, rngs=nnx.Rngs(params=seed))
