"""mtan_jax: MTAN (Multi-Task Attention Network) and multi-task dense prediction in JAX."""

__version__ = "0.1.0"
