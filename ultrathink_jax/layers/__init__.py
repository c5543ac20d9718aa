"""Building blocks of the decoder; `ultrathink_jax.model` assembles them."""
