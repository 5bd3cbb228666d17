"""didr_jax: reinforcement-learning post-training of text-to-image diffusion models in JAX."""

__version__ = "0.1.0"
