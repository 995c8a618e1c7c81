"""The paper's three training stages as presets: what trains and at which learning rate (one loop serves all):

1. ``vision``: the ViT and the merger learn from image-text pairs; the LLM is frozen.
2. ``all``: everything trains, on broader multimodal data.
3. ``instruct``: the ViT is frozen; the merger and the LLM learn instruction following in ChatML.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Stage:
    name: str
    vision: bool  # the ViT blocks and the patch embedding
    merger: bool
    llm: bool  # the decoder, the embeddings and the LM head
    lr: float
    vision_lr_scale: float = 1.0  # the ViT's learning rate relative to lr (lower when it is already trained)


STAGES = {
    1: Stage("vision", vision=True, merger=True, llm=False, lr=1e-3),
    2: Stage("all", vision=True, merger=True, llm=True, lr=2e-5, vision_lr_scale=0.1),
    3: Stage("instruct", vision=False, merger=True, llm=True, lr=1e-5),
}


def stage(number: int) -> Stage:
    if number not in STAGES:
        raise ValueError(f"stage must be 1, 2 or 3, got {number}")
    return STAGES[number]


def param_groups(model: nn.Module, st: Stage, lr: float | None = None, weight_decay: float = 0.0) -> list[dict]:
    """Freeze what the stage does not train and return AdamW groups for the rest: ViT, merger, LLM, each with its
    learning rate; no weight decay on biases and norm scales (1-D tensors)."""
    lr = st.lr if lr is None else lr
    parts = {
        "vision": ([p for n, p in model.visual.named_parameters() if not n.startswith("merger.")], st.vision),
        "merger": (list(model.visual.merger.parameters()), st.merger),
        "llm": ([*model.model.parameters(), *model.lm_head.parameters()], st.llm),
    }
    groups = []
    for name, (params, trains) in parts.items():
        for p in params:
            p.requires_grad_(trains)
        if not trains:
            continue
        group_lr = lr * (st.vision_lr_scale if name == "vision" else 1.0)
        unique = list({id(p): p for p in params}.values())  # tied head = embedding
        for suffix, decay, chosen in (("", weight_decay, [p for p in unique if p.ndim > 1]),
                                      (".no_decay", 0.0, [p for p in unique if p.ndim <= 1])):
            if chosen:
                groups.append({"name": name + suffix, "params": chosen, "lr": group_lr, "weight_decay": decay,
                               "base_lr": group_lr})
    return groups
