import jax.numpy as jnp
from flax import linen as nn

from ultrathink_jax.config import ModelConfig
from ultrathink_jax.layers.init import embedding_init


def gathered_table(table):
    """The [vocab, embed] table with its embed axis gathered (see TokenEmbedding)."""
    return nn.with_logical_constraint(table, ("vocab", None))


class TokenEmbedding(nn.Module):
    """Token lookup and, for tied models, the output projection, sharing one [vocab, embed] table.

    Both uses first gather the table's embed axis (FSDP's usual weight all-gather): looked up while still split
    over `fsdp`, the rows come out split along embed and XLA must replicate them to reach the batch layout.
    """

    config: ModelConfig

    def setup(self):
        cfg = self.config
        self.embedding = self.param("embedding", nn.with_logical_partitioning(embedding_init(cfg), ("vocab", "embed")),
                                    (cfg.vocab_size, cfg.d_model), jnp.float32)

    def _table(self):
        return gathered_table(self.embedding).astype(self.config.dtype)

    def __call__(self, tokens):
        return jnp.take(self._table(), tokens, axis=0)

    def attend(self, x):
        rows = x.reshape(-1, x.shape[-1]).astype(self.config.dtype)  # 2-D, as in `Linear`: no layout copies on CPU
        return (rows @ self._table().T).reshape(*x.shape[:-1], -1)
