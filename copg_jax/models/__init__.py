"""Flax NNX decoders of Hugging Face architectures, loaded from and saved to HF folders (no torch).

Families (HF `model_type`): llama, mistral, ministral, qwen2, qwen3, smollm3, seed_oss (`llama.py`), gemma,
gemma2, gemma3_text and gemma3's language model (`gemma.py`), olmo2, olmo3 (`olmo.py`), exaone4
(`exaone.py`), phi3 (`phi3.py`), granite (`granite.py`), glm, glm4 (`glm.py`), the mixtures of experts
mixtral, qwen2_moe, qwen3_moe, olmoe (`moe_families.py`; their layer: `moe.py`, its GPU kernels:
`grouped_matmul.py`), gpt2 (`gpt2.py`), gpt_neox (`gpt_neox.py`).
All share one `Decoder` (`decoder.py`, blocks in `layers.py`) described by a `ModelConfig`; a family module
only translates config.json and tensor names (`hf_io.TensorMap`).

    cfg = load_config(path)                  # ModelConfig from a local HF folder's config.json
    cfg = ModelConfig.from_hf(hf_dict)       # ValueError naming an unsupported model_type
    model = from_config(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32, mesh=None,
                        remat="none", attention="auto", scan_layers=False)
    model = from_pretrained(path, dtype=jnp.bfloat16, param_dtype=jnp.float32, mesh=None, remat="none",
                            attention="auto", scan_layers=False)
    save_pretrained(model, path, dtype=None, base="")  # config.json + model.safetensors, loadable by
                                             # transformers (base: the folder it was fine-tuned from)
    tok = load_tokenizer(path)               # AutoTokenizer, offline

    hidden = model(input_ids, positions, segment_ids, prefix_ids)  # [N, T] int32 each -> [N, T, D]
    hidden, aux = model(..., router_aux=True)   # a mixture of experts: also its load-balancing loss
    logits = model.logits(hidden)            # [..., D] -> [..., V] float32
    kernel = model.head_kernel()             # [D, V] output head in the parameters' dtype
    model.config.num_params(), model.config.flops_per_token(seq_len)

The four [N, T] inputs follow the token layout of `copg_jax.batch` (segments, shared prefixes, positions).

Decoding with a KV cache (a pytree of plain arrays, `KVCache`):

    cache = model.init_cache(batch_size, max_length, dtype=None)
    hidden, cache = model.decode(input_ids, positions, segment_ids, cache)   # [N, S] each, S >= 1

`decode` writes S tokens at `cache.index` for every row; each token attends to earlier slots of its own
segment (segment 0 = padding, never attended to). Prefill a left- or right-padded prompt batch with S = prompt
width, then step with S = 1 (segment 1, positions continuing per row): logits equal a full forward pass.
`model.prefill(...)` (same arguments, an empty cache) does the first step with the model's attention backend
over the prompt alone (flash kernels on accelerators) instead of a mask over every cache slot.

Sharding: every parameter carries `logical_axes` metadata (names of `copg_jax.sharding.LOGICAL_RULES`).
`param_shardings(model_or_state, mesh)` returns the matching `nnx.State` of NamedShardings (dims that the mesh
axes do not divide are replicated), for `jax.jit` in/out shardings. With `mesh=`, `from_config` creates and
`from_pretrained` reads each parameter straight into its sharding (per-device slices of memory-mapped files).

Remat ("none" | "full" | "dots_saveable" | "minimal" | "attention" | "minimal_attention") wraps each block in
`nnx.remat` with that policy; the two "attention" policies keep each block's attention output and log-sum-exp
(tagged by the flash backends), so the backward pass never re-runs attention nor stores its probabilities.

Attention (`attention.py`): `attention(q, k, v, AttentionPattern(segment_ids, prefix_ids, positions, window,
backend), scale=...)` with backends auto | xla (explicit-mask reference) | blockwise (flash attention in plain
JAX) | pallas_gpu (Triton kernels) | cudnn | splash (TPU); the layout's mask is never built as [T, T] outside
the xla reference.

`scan_layers=True` holds the blocks as one Block with parameters stacked along a leading "layers" axis, run by
`lax.scan` (compile time independent of depth; layers of different windows or RoPE, `ModelConfig.layer_kind`,
by one `lax.switch` branch per kind); the same seed gives the same weights, HF folders are read and
written with the same per-layer names, and the KV cache then holds one [L, N, S, KV, Dh] array for k and v.
"""

from copg_jax.models.config import FAMILIES, ModelConfig, load_config
from copg_jax.models.decoder import Decoder, KVCache
from copg_jax.models.hub import (
    from_config,
    from_pretrained,
    is_model_file,
    load_tokenizer,
    param_shardings,
    remove_model_files,
    remove_old_weights,
    save_pretrained,
)

__all__ = [
    "FAMILIES",
    "Decoder",
    "KVCache",
    "ModelConfig",
    "from_config",
    "from_pretrained",
    "load_config",
    "load_tokenizer",
    "is_model_file",
    "param_shardings",
    "remove_model_files",
    "remove_old_weights",
    "save_pretrained",
]
