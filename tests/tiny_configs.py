"""Tiny model configs that several test files build models of."""

from copg_jax.models import ModelConfig

# a 2-layer Qwen2 (q/k/v biases, grouped-query attention) over a vocabulary of 96
QWEN2 = ModelConfig(
    model_type="qwen2",
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    qkv_bias=True,
)
