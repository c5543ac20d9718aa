"""ultrathink_jax.tree.leaf_at: the one lookup of a parameter by its mapping-table path."""

import pytest

from ultrathink_jax.tree import leaf_at

TREE = {"layers": {"block_0": {"self_attn": {"q_proj": {"kernel": "Q"}}}}, "embed": {"embedding": "E"}}


def test_leaf_at_follows_the_path():
    assert leaf_at(TREE, ("layers", "block_0", "self_attn", "q_proj", "kernel")) == "Q"
    assert leaf_at(TREE, ()) is TREE


@pytest.mark.parametrize("path", [("layers", "block_1", "self_attn"), ("embed", "embedding", "kernel")],
                         ids=["missing key", "below a leaf"])
def test_a_missing_path_is_a_key_error_naming_the_whole_path(path):
    with pytest.raises(KeyError, match="/".join(path)):
        leaf_at(TREE, path)
