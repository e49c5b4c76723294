"""Label extraction and gate training (optax, sharded over a device mesh, orbax checkpoints)."""
