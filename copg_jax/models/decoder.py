"""The decoder all families share: embeddings -> pre-norm blocks -> final norm, logits, KV-cache decode.

Families differ only in their `ModelConfig` and in how their HF tensors map onto these parameters.

The blocks are either a list (`layers[i]`, unrolled into the compiled program: compile time grows with depth)
or, with `scan_layers=True`, one Block whose parameters are stacked along a leading "layers" axis and run by
`lax.scan` (one compiled block whatever the depth, as MaxText's scan_layers). Both initialise the same
weights; `models.hub` maps HF tensor `layers.{i}.*` to slice i of a stacked parameter.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct

from copg_jax.batch import sequences_per_token
from copg_jax.models import mixed
from copg_jax.models.attention import ATTENTION_LSE, ATTENTION_OUT, BACKENDS, AttentionPattern, cap_logits
from copg_jax.models.config import LayerKind, ModelConfig
from copg_jax.models.layers import MLP, Attention, CacheMask, Dense, make_norm, param
from copg_jax.models.lora import LoRASpec
from copg_jax.models.mixed import PARAM_MATMUL
from copg_jax.models.moe import EXPERT_MATMUL, MoE, load_balancing_loss
from copg_jax.sharding import constrain

_policies = jax.checkpoint_policies


def _and_named(policy, *names: str):
    """`policy`, also keeping the values `checkpoint_name` gives one of `names`."""
    return _policies.save_from_both_policies(policy, _policies.save_only_these_names(*names))


REMAT_POLICIES = {
    "full": _policies.nothing_saveable,  # recompute the whole block in the backward pass
    # keep every matmul output (a mixture of experts' grouped matmuls too; a mixed-precision model's weight
    # matmuls, whose dots jax.checkpoint cannot see, by name: `copg_jax.models.mixed`)
    "dots_saveable": _and_named(_policies.dots_saveable, EXPERT_MATMUL, PARAM_MATMUL),
    # keep weight matmuls (the experts' too), not attention's
    "minimal": _and_named(_policies.dots_with_no_batch_dims_saveable, EXPERT_MATMUL, PARAM_MATMUL),
    # keep the attention output and log-sum-exp (never the probabilities), so no attention forward is re-run
    "attention": _policies.save_only_these_names(ATTENTION_OUT, ATTENTION_LSE),
    "minimal_attention": _and_named(
        _policies.dots_with_no_batch_dims_saveable, EXPERT_MATMUL, PARAM_MATMUL, ATTENTION_OUT, ATTENTION_LSE
    ),
}


def remat_policy(name: str):
    """The jax.checkpoint policy of a remat name ("none" -> None: no remat at all)."""
    if name != "none" and name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; choose none or one of {sorted(REMAT_POLICIES)}")
    return REMAT_POLICIES.get(name)


HIDDEN = ("batch", "length", "act_embed")


def _gathered_rows(table: jax.Array) -> jax.Array:
    """An embedding table [V, D] as its lookup reads it on a mesh: the width gathered (as FSDP gathers a
    kernel), the vocabulary left split over `tensor`; each device takes its rows' embeddings for its own batch
    shard (summed over the vocabulary split). Left to XLA, the lookup's output came out split along the width
    and was replicated whole to be resharded by batch ("involuntary full rematerialization")."""
    return constrain(table, ("vocab", None))


def _replicated(table: jax.Array) -> jax.Array:
    """A small table (GPT-2's learned positions, [P, D]) whole on every device for its lookup."""
    return constrain(table, (None, None))


# transformers' models whose generation drops the KV cache when a sequence first reaches past LongRoPE's
# pretrained length and re-encodes it with the long factors (their prepare_inputs_for_generation: Phi-3 and
# its kin; we load phi3); the others (Llama with LongRoPE) keep the cached keys in their short rotation
LONGROPE_REENCODING = ("phi3", "phimoe", "phi4_multimodal")


@struct.dataclass
class KVCache:
    """Per-layer keys/values of a decode, plus the segment id and position of every cached slot.

    Attributes:
      k, v: tuples (one per layer) of [N, S, KV, Dh] arrays; one [L, N, S, KV, Dh] array each when the
        decoder scans its layers.
      segment_ids: [N, S] int32 segment of each slot, 0 = padding or not yet written (never attended to).
      positions: [N, S] int32 position of each slot (for sliding windows).
      index: [] int32 next slot to write, shared by all rows.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    segment_ids: jax.Array
    positions: jax.Array
    index: jax.Array

    def where(self, rows: jax.Array, other: KVCache) -> KVCache:
        """This cache's rows where `rows` [N] bool is True, `other`'s elsewhere (same shapes; this index)."""

        def pick(batch_axis: int):
            def select(mine: jax.Array, theirs: jax.Array) -> jax.Array:
                shape = [1] * mine.ndim
                shape[batch_axis] = -1
                return jnp.where(rows.reshape(shape), mine, theirs)

            return select

        stacked = not isinstance(self.k, tuple)  # a scanning decoder's [L, N, S, KV, Dh]
        k, v = jax.tree.map(pick(1 if stacked else 0), (self.k, self.v), (other.k, other.v))
        ids = jax.tree.map(pick(0), (self.segment_ids, self.positions), (other.segment_ids, other.positions))
        return KVCache(k, v, *ids, self.index)


def _norm(norm, x: jax.Array) -> jax.Array:
    return x if norm is None else norm(x)


class Block(nnx.Module):
    """Pre-norm residual block: sequential (x + attn, then + mlp) or GPT-NeoX's parallel residual; with
    `post_norms` (Gemma 2/3, OLMo 2/3) the attention and MLP outputs are normed before their residual add,
    and without `pre_norms` (OLMo 2/3) their inputs are not. The MLP is a mixture of experts (`moe.MoE`) when
    the config has experts."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rngs: nnx.Rngs,
        dtype,
        param_dtype,
        lora: LoRASpec | None = None,
        grouped: str = "auto",
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.attn_norm = make_norm(cfg, **kw) if cfg.pre_norms else None
        self.attn = Attention(cfg, rngs=rngs, lora=lora, **kw)
        self.mlp_norm = make_norm(cfg, **kw) if cfg.pre_norms else None
        if cfg.num_experts:
            self.mlp = MoE(cfg, rngs=rngs, lora=lora, grouped=grouped, **kw)
        else:
            self.mlp = MLP(cfg, rngs=rngs, lora=lora, **kw)
        self.attn_post_norm = make_norm(cfg, **kw) if cfg.post_norms else None
        self.mlp_post_norm = make_norm(cfg, **kw) if cfg.post_norms else None
        self.parallel_residual = cfg.parallel_residual
        self.residual_multiplier = cfg.residual_multiplier

    def _scaled(self, branch: jax.Array) -> jax.Array:
        """A branch's output as its residual add takes it (Granite's residual_multiplier)."""
        return branch if self.residual_multiplier == 1.0 else branch * self.residual_multiplier

    def __call__(self, x, positions, mask, kind: LayerKind, cache=None, dropout_key=None):
        """([N, T, D], cache) -> ([N, T, D], cache); `kind`: the layer's window and RoPE."""
        return self.routed(x, positions, mask, kind, cache, dropout_key)[:2]

    def routed(self, x, positions, mask, kind: LayerKind, cache=None, dropout_key=None, counted=None):
        """`__call__`, and the routing of a mixture of experts over the tokens `counted` [N, T] weighs
        (`moe.RouterStats`; None without experts or `counted`)."""
        attn, cache = self.attn(_norm(self.attn_norm, x), positions, mask, kind, cache, dropout_key)
        if self.attn_post_norm is not None:
            attn = self.attn_post_norm(attn)
        after_attn = x + self._scaled(attn)
        h = _norm(self.mlp_norm, x if self.parallel_residual else after_attn)
        if isinstance(self.mlp, MoE) and counted is not None:
            mlp, stats = self.mlp.routed(h, counted)
        else:
            mlp, stats = self.mlp(h, dropout_key), None
        if self.mlp_post_norm is not None:
            mlp = self.mlp_post_norm(mlp)
        return constrain(after_attn + self._scaled(mlp), HIDDEN), cache, stats


def _block_call(remat: str, kind: LayerKind):
    """block, x, positions, mask, dropout_key, counted -> (the block's output for a layer of `kind`, its
    router stats or None: `Block.routed`), rematerialised by the `remat` policy (the kind is bound, not
    traced: it is static)."""

    def call(block: Block, x, positions, mask, dropout_key, counted):
        out, _, stats = block.routed(x, positions, mask, kind, None, dropout_key, counted)
        return out, stats

    return call if remat == "none" else nnx.remat(call, policy=remat_policy(remat))


def _switch(fns: list, index: jax.Array, *operands):
    """fns[index](*operands) for a traced index (one `lax.switch` branch per function; a plain call for
    one function)."""
    return fns[0](*operands) if len(fns) == 1 else jax.lax.switch(index, fns, *operands)


def stack_blocks(blocks: list[Block]) -> Block:
    """One Block whose parameters are the blocks' parameters stacked along a new leading "layers" axis."""
    graphdef = nnx.graphdef(blocks[0])

    def stack(*variables: nnx.Variable) -> nnx.Variable:
        axes = ("layers", *variables[0].get_metadata()["logical_axes"])
        return variables[0].replace(jnp.stack([v.get_value() for v in variables]), logical_axes=axes)

    states = [nnx.state(b) for b in blocks]
    return nnx.merge(graphdef, jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable)))


class Decoder(nnx.Module):
    """Decoder-only LM. `__call__` gives final-normed hidden states; `logits` applies the output head.

    Args:
      cfg: the architecture.
      rngs: initialisation randomness.
      dtype: compute dtype of activations.
      param_dtype: storage dtype of parameters.
      remat: "none" or a REMAT_POLICIES name — rematerialisation of each block in the backward.
      attention: the attention backend (`copg_jax.models.attention.BACKENDS`) of `__call__`; KV-cache decoding
        always uses plain XLA attention.
      scan_layers: hold the blocks as one layer-stacked Block run by `lax.scan` (see the module docstring).
      lora: LoRA adapters on the spec's sites of every block (`copg_jax.models.lora`; A drawn from the
        `lora` stream of `rngs`), or None.
      grouped_matmul: a mixture of experts' grouped matmul (`copg_jax.models.moe.GROUPED_IMPLS`).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat="none",
        attention="auto",
        scan_layers: bool = False,
        lora: LoRASpec | None = None,
        grouped_matmul: str = "auto",
    ):
        remat_policy(remat)  # fail early on an unknown name
        if attention not in BACKENDS:
            raise ValueError(f"unknown attention backend {attention!r}; choose one of {BACKENDS}")
        d = cfg.hidden_size
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.config, self.dtype, self.param_dtype, self.remat = cfg, dtype, param_dtype, remat
        self.attention, self.scan_layers, self.lora_spec = attention, scan_layers, lora
        self.grouped_matmul = grouped_matmul
        self.embed = param(
            jax.random.normal(rngs.params(), (cfg.vocab_size, d), param_dtype) * 0.02, ("vocab", "embed")
        )
        learned = cfg.position_embedding == "learned"
        pos_init = jax.random.normal(rngs.params(), (cfg.max_position_embeddings, d), param_dtype) * 0.01
        self.pos_embed = param(pos_init, (None, "embed")) if learned else None
        blocks = [
            Block(cfg, rngs=rngs, lora=lora, grouped=grouped_matmul, **kw) for _ in range(cfg.num_layers)
        ]
        self.layers = stack_blocks(blocks) if scan_layers else nnx.List(blocks)
        self.final_norm = make_norm(cfg, **kw)
        tied = cfg.tie_embeddings
        self.lm_head = (
            None if tied else Dense((d,), (cfg.vocab_size,), ("embed", "vocab"), bias=False, rngs=rngs, **kw)
        )

    @property
    def settings(self) -> dict:
        """The constructor's keyword arguments besides `rngs` and `lora` (dtype, param_dtype, remat,
        attention, scan_layers, grouped_matmul): `Decoder(model.config, rngs=..., **model.settings)` is built
        and computes as `model` is and does. The one list of them, for code that builds a decoder like another
        (adapters, a reward model from a policy)."""
        return dict(
            dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat, attention=self.attention,
            scan_layers=self.scan_layers, grouped_matmul=self.grouped_matmul,
        )  # fmt: skip

    @jax.named_scope("embed")
    def _embed(self, input_ids, positions):
        x = mixed.take(self.embed[...], input_ids, self.dtype, _gathered_rows)
        if self.config.embed_scale:  # Gemma rounds the normaliser to the compute dtype
            x = x * jnp.asarray(self.config.hidden_size**0.5, self.dtype)
        if self.config.embedding_multiplier != 1.0:  # Granite
            x = x * self.config.embedding_multiplier
        if self.pos_embed is not None:
            x = x + mixed.take(self.pos_embed[...], positions, self.dtype, _replicated)
        return constrain(x, HIDDEN)

    def _pattern(self, segment_ids, prefix_ids, positions, layout: str = "any") -> AttentionPattern:
        """The AttentionPattern of rows with these ids and the model's attention backend (each layer sets its
        own window)."""
        with jax.named_scope("mask"):
            return AttentionPattern(segment_ids, prefix_ids, positions, None, self.attention, layout)

    def __call__(
        self,
        input_ids,
        positions,
        segment_ids,
        prefix_ids,
        *,
        remat: str | None = None,
        dropout_key: jax.Array | None = None,
        layout: str = "any",
        router_aux: bool = False,
    ):
        """Final-normed hidden states of a TokenBatch layout (see `copg_jax.batch`).

        Args:
          input_ids, positions, segment_ids, prefix_ids: [N, T] int32.
          remat: overrides the constructor's remat policy for this call.
          dropout_key: randomness of LoRA dropout (layer i folds in i); None = no dropout.
          layout: the `copg_jax.data.layout` layout of every row when known ("padded" | "packed" |
            "shared_prefix"), which picks kernels statically (attention.AttentionPattern); "any": by the ids.
          router_aux: also return a mixture of experts' load-balancing loss (`moe.load_balancing_loss`) over
            every layer and the tokens of every sequence (padding, segment 0, left out; a shared prefix's
            once per sequence sharing it, `batch.sequences_per_token`, as the padded layout holds it).
        Returns:
          [N, T, D] hidden states in the compute dtype; with `router_aux`, (those, [] float32 loss).
        """
        remat = self.remat if remat is None else remat
        mask = self._pattern(segment_ids, prefix_ids, positions, layout)
        x = self._embed(input_ids, positions)
        layer_keys = None
        if dropout_key is not None:
            layer_keys = jax.vmap(jax.random.fold_in, (None, 0))(
                dropout_key, jnp.arange(self.config.num_layers)
            )
        if router_aux and not self.config.num_experts:
            raise ValueError(f"{self.config.model_type}: a load-balancing loss needs a mixture of experts")
        # each token as often as the sequences it is part of: a shared prompt once per completion
        counted = sequences_per_token(segment_ids, prefix_ids) if router_aux else None
        kinds, kind_ids = self.config.layer_kinds()
        calls = [_block_call(remat, kind) for kind in kinds]
        if not self.scan_layers:
            per_layer = []
            for i, block in enumerate(self.layers):
                key = None if layer_keys is None else layer_keys[i]
                x, stats = calls[kind_ids[i]](block, x, positions, mask, key, counted)
                per_layer.append(stats)
            stats = jax.tree.map(lambda *s: sum(s), *per_layer) if router_aux else None
        else:
            graphdef, stacked = nnx.split(self.layers)

            def branch(call, params, x, key):
                return call(nnx.merge(graphdef, params), x, positions, mask, key, counted)

            branches = [functools.partial(branch, call) for call in calls]

            def layer(x, xs):
                params, key, kind_id = xs
                return _switch(branches, kind_id, params, x, key)

            x, stacked_stats = jax.lax.scan(layer, x, (stacked, layer_keys, jnp.asarray(kind_ids, jnp.int32)))
            stats = jax.tree.map(lambda s: s.sum(0), stacked_stats) if router_aux else None
        hidden = self.final_norm(x)
        return (hidden, load_balancing_loss(stats)) if router_aux else hidden

    def head_kernel(self) -> jax.Array:
        """The output head as a [D, V] matrix in the parameters' dtype (tied: the input table, transposed),
        divided by Granite's logits_scaling (the logits' divisor) in float32 or wider. Cast to the compute
        dtype where it is used, so that its gradient is summed in the parameters' dtype
        (`copg_jax.logprobs`)."""
        kernel = self.embed[...].T if self.lm_head is None else self.lm_head.kernel[...]
        if self.config.logits_scaling != 1.0:
            wide = jnp.promote_types(kernel.dtype, jnp.float32)
            kernel = (kernel.astype(wide) / self.config.logits_scaling).astype(kernel.dtype)
        return kernel

    @jax.named_scope("head")
    def logits(self, hidden: jax.Array) -> jax.Array:
        """[..., D] hidden states -> [..., V] float32 logits (capped by `config.final_softcap`, Gemma 2)."""
        kernel = self.head_kernel().astype(self.dtype)
        logits = jnp.dot(hidden.astype(self.dtype), kernel, preferred_element_type=jnp.float32)
        return cap_logits(logits, self.config.final_softcap)

    @property
    def reencode_position(self) -> int | None:
        """The position whose decoding step re-encodes a row's whole sequence in generation
        (`copg_jax.generate`): LongRoPE's pretrained length, where the row's rotation turns from short to long
        factors, for a model whose transformers generation re-encodes there (`LONGROPE_REENCODING`); None for
        the others."""
        return self.config.split_length if self.config.model_type in LONGROPE_REENCODING else None

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
        """An empty cache of max_length slots per row (dtype defaults to the compute dtype), its arrays
        constrained to their logical shardings (rows along "batch", KV heads along "kv_heads")."""
        cfg = self.config
        shape = (batch_size, max_length, cfg.num_kv_heads, cfg.head_dim)
        axes = ("batch", "length", "kv_heads", "head_dim")
        if self.scan_layers:
            zeros = constrain(jnp.zeros((cfg.num_layers, *shape), dtype or self.dtype), ("layers", *axes))
        else:
            zeros = tuple(
                constrain(jnp.zeros(shape, dtype or self.dtype), axes) for _ in range(cfg.num_layers)
            )
        slots = constrain(jnp.zeros((batch_size, max_length), jnp.int32), ("batch", "length"))
        return KVCache(k=zeros, v=zeros, segment_ids=slots, positions=slots, index=jnp.zeros((), jnp.int32))

    @staticmethod
    def _slot_ids(cache: KVCache, segment_ids, positions) -> tuple[jax.Array, jax.Array]:
        """The cache's [N, L] segment ids and positions with the S new tokens' written at `cache.index`."""
        return (
            jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, (0, cache.index)),
            jax.lax.dynamic_update_slice(cache.positions, positions, (0, cache.index)),
        )

    def _cached_layers(
        self, input_ids, positions, mask, cache: KVCache, slot_ids
    ) -> tuple[jax.Array, KVCache]:
        """(final-normed hidden states of the S new tokens, the cache holding them): every layer writes their
        keys and values at `cache.index`; `slot_ids` = `_slot_ids` of the new tokens."""
        x = self._embed(input_ids, positions)
        kinds, kind_ids = self.config.layer_kinds()
        if self.scan_layers:
            graphdef, stacked = nnx.split(self.layers)

            def branch(kind, params, x, k, v):
                return nnx.merge(graphdef, params)(x, positions, mask, kind, (k, v, cache.index))

            branches = [functools.partial(branch, kind) for kind in kinds]

            def layer(x, xs):
                params, k, v, kind_id = xs
                return _switch(branches, kind_id, params, x, k, v)

            xs = (stacked, cache.k, cache.v, jnp.asarray(kind_ids, jnp.int32))
            x, (ks, vs) = jax.lax.scan(layer, x, xs)
        else:
            ks, vs = [], []
            for block, k, v, kind_id in zip(self.layers, cache.k, cache.v, kind_ids, strict=True):
                x, (k, v) = block(x, positions, mask, kinds[kind_id], (k, v, cache.index))
                ks.append(k)
                vs.append(v)
            ks, vs = tuple(ks), tuple(vs)
        return self.final_norm(x), KVCache(ks, vs, *slot_ids, cache.index + input_ids.shape[1])

    def prefill(self, input_ids, positions, segment_ids, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """`decode` of a prompt into an empty cache (from `init_cache`), with the model's attention backend
        over the prompt's own tokens (flash kernels on accelerators: no [S, S] mask or scores), where `decode`
        masks every cache slot explicitly. Same results as `decode` on an empty cache.

        Args:
          input_ids, positions, segment_ids: [N, S] int32 (segment 0 = padding, left or right).
          cache: from `init_cache`, nothing written yet.
        Returns:
          ([N, S] hidden states, the cache holding the S tokens).
        """
        pattern = self._pattern(segment_ids, jnp.zeros_like(segment_ids), positions)
        slot_ids = self._slot_ids(cache, segment_ids, positions)
        return self._cached_layers(input_ids, positions, pattern, cache, slot_ids)

    def decode(self, input_ids, positions, segment_ids, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Appends S tokens per row at `cache.index` and returns their hidden states.

        Each new token attends to cached or new tokens of its own segment at or before its slot; padding
        (segment 0) is written but never attended to, so left- or right-padded prefill followed by 1-token
        steps equals a full forward pass.

        Args:
          input_ids, positions, segment_ids: [N, S] int32 (segment 0 = padding).
          cache: from `init_cache` or a previous `decode`.
        Returns:
          ([N, S, D] hidden states, updated cache).
        """
        s, length = input_ids.shape[1], cache.segment_ids.shape[1]
        index = cache.index
        key_segments, key_positions = slot_ids = self._slot_ids(cache, segment_ids, positions)
        slots = jnp.arange(length)
        query_slots = index + jnp.arange(s)
        causal = slots[None, :] <= query_slots[:, None]  # [S, L]
        same = (key_segments[:, None, :] == segment_ids[:, :, None]) & (key_segments[:, None, :] != 0)
        own_slot = (slots[None, :] == query_slots[:, None])[None, None]
        mask = CacheMask((causal[None] & same)[:, None], own_slot, positions, key_positions)
        return self._cached_layers(input_ids, positions, mask, cache, slot_ids)
