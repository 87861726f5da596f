"""Keep our extra checkpoint state loadable with `torch.load(weights_only=True)`, Lightning's safe default.

That loader accepts tensors and plain Python values but no numpy arrays, so arrays travel as tensors (sharing
memory, no copy) and come back as arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def arrays_to_tensors(tree: Any) -> Any:
    if isinstance(tree, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(tree))
    if isinstance(tree, dict):
        return {key: arrays_to_tensors(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(arrays_to_tensors(value) for value in tree)
    return tree


def tensors_to_arrays(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.numpy()
    if isinstance(tree, dict):
        return {key: tensors_to_arrays(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(tensors_to_arrays(value) for value in tree)
    return tree
