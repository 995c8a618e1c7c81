"""The KV cache: preallocated per-layer key/value tensors plus what decoding needs to continue.

Passed into the model and handed back; the model keeps nothing between calls. Rows of a batch share one slot
counter (left padding keeps them aligned).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import TextConfig


@dataclass
class KVCache:
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (k, v): [B, KVH, capacity, K]
    key_mask: torch.Tensor  # [B, capacity] bool: the slot holds a real (non-padding) token
    next_position: torch.Tensor  # [B] long
    length: int = 0  # slots filled
    padded: bool = False  # some filled slot is padding: attention needs an explicit mask

    @classmethod
    def allocate(cls, config: TextConfig, batch: int, capacity: int, dtype: torch.dtype, device: torch.device | str,
                 zeroed: bool = False) -> KVCache:
        """``zeroed``: when masked slots inside the attended range may never be written (continuous batching),
        they must not hold NaN bit patterns from reused memory: a masked key has weight 0, and 0 * NaN = NaN."""
        shape = (batch, config.num_key_value_heads, capacity, config.head_dim)
        new = torch.zeros if zeroed else torch.empty
        layers = [tuple(new(shape, dtype=dtype, device=device) for _ in "kv") for _ in range(config.num_hidden_layers)]
        return cls(
            layers=layers,
            key_mask=torch.zeros(batch, capacity, dtype=torch.bool, device=device),
            next_position=torch.zeros(batch, dtype=torch.long, device=device),
        )

    @property
    def capacity(self) -> int:
        return self.key_mask.shape[1]

    def attention_mask(self, new: int) -> torch.Tensor | None:
        """Mask for ``new`` tokens about to be written after the filled slots; None when nothing is padding."""
        return causal_padding_mask(self.key_mask[:, : self.length + new], self.length) if self.padded else None


def causal_padding_mask(key_mask_BS: torch.Tensor, start: int) -> torch.Tensor:
    """Bool mask [B, 1, S-start, S] (True = attend) for queries at slots start..S-1 over keys 0..S-1: causal, with
    padding keys hidden. A padding query still sees itself so that no row is all-False (an all-masked softmax
    gives NaN, and NaN in a pad slot would leak through 0 * NaN)."""
    S = key_mask_BS.shape[1]
    query = torch.arange(start, S, device=key_mask_BS.device)[:, None]
    key = torch.arange(S, device=key_mask_BS.device)[None]
    return (((key <= query) & key_mask_BS[:, None, :]) | (key == query))[:, None]
