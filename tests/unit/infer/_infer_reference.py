"""Helpers of the stage 4 unit tests: random V2 cells and a plain one-cell-at-a-time reference."""

from __future__ import annotations

import numpy as np
import torch

N_GENES = 100
MAX_POS = 64


def random_cells(
    n: int, seed: int = 0, min_genes: int = 5, max_genes: int = MAX_POS - 2
) -> list[np.ndarray]:
    """V2 cells: <cls>, distinct random genes, <eos>; lengths spread over the range."""
    rng = np.random.default_rng(seed)
    cells = []
    for _ in range(n):
        k = int(rng.integers(min_genes, max_genes + 1))
        genes = rng.choice(np.arange(4, 4 + N_GENES), size=k, replace=False)
        cells.append(np.concatenate([[2], genes, [3]]).astype(np.int64))
    return cells


def direct_hidden(model: torch.nn.Module, ids: np.ndarray, layer: int) -> torch.Tensor:
    """(len, hidden) output of ``layer`` for one unpadded cell, through the full HF model."""
    with torch.no_grad():
        out = model.bert(torch.as_tensor(ids)[None], output_hidden_states=True)
    # hidden_states[0] is the embedding output; ``layer`` indexes the layers' outputs
    return out.hidden_states[layer if layer < 0 else layer + 1][0].float()


def direct_cell_embedding(model: torch.nn.Module, ids: np.ndarray, layer: int) -> torch.Tensor:
    """Mean over gene tokens (specials excluded) of one cell's layer output."""
    h = direct_hidden(model, ids, layer)
    genes = torch.as_tensor(ids >= 4)
    return h[genes].mean(0)
