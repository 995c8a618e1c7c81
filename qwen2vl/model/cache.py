"""The KV cache: preallocated per-layer key/value tensors plus what decoding needs to continue.

It is an ordinary object passed into the model and handed back; the model keeps nothing between
calls. Rows of a batch share one slot counter (left padding keeps them aligned); ``key_mask`` marks
which slots hold real tokens and ``next_position`` is each row's M-RoPE position for its next token.
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
    def allocate(
        cls,
        config: TextConfig,
        batch: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str,
        zeroed: bool = False,
    ) -> KVCache:
        """``zeroed``: when masked slots inside the attended range may never be written (continuous batching),
        they must not hold NaN bit patterns from reused memory: a masked key has weight 0, and 0 * NaN = NaN."""
        shape = (batch, config.num_key_value_heads, capacity, config.head_dim)
        new = torch.zeros if zeroed else torch.empty
        layers = [
            (new(shape, dtype=dtype, device=device), new(shape, dtype=dtype, device=device))
            for _ in range(config.num_hidden_layers)
        ]
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
        if not self.padded:
            return None
        return causal_padding_mask(self.key_mask[:, : self.length + new], self.length)


def causal_padding_mask(key_mask_BS: torch.Tensor, start: int) -> torch.Tensor:
    """Bool mask [B, 1, S-start, S] (True = attend) for queries at slots start..S-1 over keys 0..S-1.

    Causal, with padding keys hidden; a padding query still sees itself so that no row is all-False
    (an all-masked softmax gives NaN, and NaN in a pad slot would leak through 0 * NaN).
    """
    S = key_mask_BS.shape[1]
    new = S - start
    causal = torch.ones(new, S, dtype=torch.bool, device=key_mask_BS.device).tril(start)
    diag = torch.zeros_like(causal)
    diag[torch.arange(new), torch.arange(start, S)] = True
    return ((causal & key_mask_BS[:, None, :]) | diag)[:, None]
