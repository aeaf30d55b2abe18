"""Hand-built next-token models on a tiny vocabulary: logits from a fixed table indexed by (position, last token)."""

import torch


def table_model(seed: int, vocab: int = 3, positions: int = 8, scale: float = 1.5):
    """A `LogitsFn` whose row at each position depends on the position and the token there (random table)."""
    table = scale * torch.randn(positions, vocab, vocab, generator=torch.Generator().manual_seed(seed))

    def logits(ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        return table[torch.arange(length), ids[0]].unsqueeze(0)

    return logits
