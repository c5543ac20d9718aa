"""The MLP activations, by Hugging Face `hidden_act` name: the one list ModelConfig accepts and the layers apply."""

import jax

ACTIVATION_FNS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}
ACTIVATIONS = tuple(ACTIVATION_FNS)
