"""TPU Pallas kernels for SmartKV-JAX, each beside a pure-jnp reference."""
