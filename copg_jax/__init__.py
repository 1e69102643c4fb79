"""copg_jax: Contrastive Policy Gradient fine-tuning of LLMs in JAX/Flax NNX."""

__version__ = "0.1.0"
