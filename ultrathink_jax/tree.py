"""Lookup in a nested-dict parameter tree by a path of keys, as the Hugging Face mapping table names leaves."""

from __future__ import annotations

from typing import Any, Sequence


def leaf_at(tree, path: Sequence[str]) -> Any:
    """tree[path[0]][path[1]]...; a missing key raises KeyError naming the whole path (a/b/c)."""
    node = tree
    for key in path:
        try:
            node = node[key]
        except (KeyError, TypeError):
            raise KeyError("/".join(path)) from None
    return node
