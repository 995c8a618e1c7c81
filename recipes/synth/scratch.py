"""Starting from nothing: a small byte-level BPE tokenizer trained on a corpus (with the Qwen2-VL special tokens
after its vocabulary), and a randomly initialised model directory in the hub layout around it, ready for
``qwen2vl train --stage 1``.

The tokenizer keeps Qwen2's pre-tokenizer (the same split regex, digits one by one, NFC), so it behaves like the
real one on the same text, only with a vocabulary sized for the corpus: a 150k-row embedding and LM head would be
most of a small model's parameters and time.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from qwen2vl import Qwen2VL, Qwen2VLConfig, TextConfig, VisionConfig
from qwen2vl.atomic import new_directory
from qwen2vl.processing.processor import save_processor_files
from qwen2vl.processing.tokenizer import SPECIAL_TOKENS, qwen2_pipeline

def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    """A byte-level BPE with ``vocab_size`` regular tokens, then the 14 Qwen2-VL special tokens (in Qwen's order,
    so ``<|endoftext|>`` is ``vocab_size`` and ``<|video_pad|>`` is ``vocab_size + 13``)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    qwen2_pipeline(tok)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])
    return tok


def small_config(
    vocab: int,
    *,
    vision_depth: int = 4,
    vision_width: int = 128,
    width: int = 256,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    rope_theta: float = 1_000_000.0,
    mrope_section: tuple[int, int, int] | None = None,
) -> Qwen2VLConfig:
    """A Qwen2-VL-architecture config sized for a CPU (same patch 14, temporal 2, merge 2). ``mrope_section``: how
    many of the head_dim/2 rotary frequencies, fastest first, turn with the temporal, height and width positions
    (default: split 1:1.5:1.5 as Qwen2-VL's (16, 24, 24))."""
    half = width // heads // 2
    quarter = half // 4
    rest = half - quarter
    mrope = tuple(mrope_section) if mrope_section else (quarter, rest // 2, rest - rest // 2)
    specials = {t: vocab + i for i, t in enumerate(SPECIAL_TOKENS)}
    vision = VisionConfig(
        depth=vision_depth, embed_dim=vision_width, num_heads=max(1, vision_width // 32), hidden_size=width
    )
    text = TextConfig(
        vocab_size=vocab + len(SPECIAL_TOKENS),
        hidden_size=width,
        intermediate_size=width * 8 // 3 // 16 * 16,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        mrope_section=mrope,
        max_position_embeddings=4096,
        rope_theta=rope_theta,
    )
    return Qwen2VLConfig(
        vision=vision,
        text=text,
        tie_word_embeddings=True,
        image_token_id=specials["<|image_pad|>"],
        video_token_id=specials["<|video_pad|>"],
        vision_start_token_id=specials["<|vision_start|>"],
        vision_end_token_id=specials["<|vision_end|>"],
        bos_token_id=specials["<|endoftext|>"],
        pad_token_id=specials["<|endoftext|>"],
        eos_token_ids=(specials["<|im_end|>"], specials["<|endoftext|>"]),
    )


def init_model_dir(
    out: str | Path,
    texts: Iterable[str],
    *,
    vocab_size: int = 1024,
    seed: int = 0,
    min_pixels: int = 4 * 28 * 28,
    max_pixels: int = 256 * 28 * 28,
    video: dict | None = None,
    **config_kwargs,
) -> Path:
    """Tokenizer + config + random weights + preprocessor/chat files, written atomically into ``out``; ``video``:
    the settings of a video_preprocessor_config.json (``save_processor_files``), none without."""
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} exists")
    with new_directory(out) as tmp:
        tok = train_tokenizer(texts, vocab_size)
        vocab = tok.get_vocab_size(with_added_tokens=False)
        config = small_config(vocab, **config_kwargs)
        torch.manual_seed(seed)
        Qwen2VL(config).save_pretrained(tmp)
        save_processor_files(
            tmp, tok.to_str(), model_max_length=4096, min_pixels=min_pixels, max_pixels=max_pixels, video=video
        )
    return out
