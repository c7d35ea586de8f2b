"""mmpo_jax: multimodal preference optimisation against hallucination, in JAX/Flax NNX."""

__version__ = "0.1.0"
