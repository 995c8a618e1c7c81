"""Shared test helpers: a random-init transformers reference model saved to disk, and prompts."""

from __future__ import annotations

import contextlib

import torch

import qwen2vl

IMG, VID, VS, VE = 151655, 151656, 151652, 151653


def hf_config(config: qwen2vl.Qwen2VLConfig):
    import transformers

    return transformers.Qwen2VLConfig(**config.to_dict())


def make_reference(config: qwen2vl.Qwen2VLConfig, path, seed: int = 0, attn: str = "eager"):
    """A random-init transformers Qwen2VLForConditionalGeneration, saved to ``path`` (hub layout)."""
    import transformers

    torch.manual_seed(seed)
    cfg = hf_config(config)
    cfg._attn_implementation = attn
    ref = transformers.Qwen2VLForConditionalGeneration(cfg).eval()
    # transformers' init leaves some norms at 1/0; perturb everything so that no mistake hides
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ref.save_pretrained(path)
    return ref


def prompt(*parts, merge: int = 2):
    """Build (input_ids, image_grid_thw, video_grid_thw) from parts: ints are text tokens,
    ("image", t, h, w) / ("video", t, h, w) become <|vision_start|> + placeholders + <|vision_end|>."""
    ids, images, videos = [], [], []
    for p in parts:
        if isinstance(p, int):
            ids.append(p)
            continue
        kind, t, h, w = p
        n = t * h * w // merge**2
        ids += [VS] + [IMG if kind == "image" else VID] * n + [VE]
        (images if kind == "image" else videos).append([t, h, w])
    grid = lambda g: torch.tensor(g, dtype=torch.long) if g else None  # noqa: E731
    return ids, grid(images), grid(videos)


def pixels(grid: torch.Tensor | None, patch_dim: int, seed: int = 1):
    if grid is None:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randn(int(grid.prod(-1).sum()), patch_dim, generator=g)


def mm_token_type_ids(input_ids: torch.Tensor) -> torch.Tensor:
    return (input_ids == IMG).long() + 2 * (input_ids == VID).long()


def left_pad(rows: list[list[int]], pad: int = 151643):
    L = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (L - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def ref_logits(ref, ids, mask=None, pv=None, ig=None, pvv=None, vg=None):
    """transformers' logits for the same inputs as ``Qwen2VL.forward`` (it also wants mm_token_type_ids)."""
    with torch.no_grad():
        return ref(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=pv,
            image_grid_thw=ig,
            pixel_values_videos=pvv,
            video_grid_thw=vg,
            mm_token_type_ids=mm_token_type_ids(ids),
        ).logits


# -- the genuine Qwen2 tokenizer, built offline (REFERENCE §1.3) --------------------------------------------

_TOKENIZER_JSON = None


def qwen2_tokenizer_json() -> str:
    """tokenizer.json of the Qwen2 tokenizer, from dashscope's qwen.tiktoken ranks (the vocabulary Qwen2 reuses):
    byte-level BPE whose merges are every split of a token into two tokens, ranked by the token's rank (what
    tiktoken's merge loop does), NFC, the Qwen2 split regex, and the 14 Qwen2-VL special tokens at 151643+."""
    global _TOKENIZER_JSON
    if _TOKENIZER_JSON is None:
        import base64
        import importlib.util
        from pathlib import Path

        from tokenizers import AddedToken, Tokenizer, models, processors

        from qwen2vl.processing.tokenizer import SPECIAL_TOKENS, qwen2_pipeline

        ranks = {}
        # found without importing dashscope, whose client pulls in cryptography, requests, ...: only this file is used
        spec = importlib.util.find_spec("dashscope")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("the tests build the Qwen2 tokenizer from dashscope's qwen.tiktoken: install dashscope")
        ranks_file = Path(list(spec.submodule_search_locations)[0]) / "resources" / "qwen.tiktoken"
        for line in ranks_file.read_bytes().splitlines():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        # GPT-2's byte -> printable character table
        keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
        table = dict(zip(keep, keep)) | {b: 256 + i for i, b in enumerate(b for b in range(256) if b not in keep)}

        def text(b: bytes) -> str:
            return "".join(chr(table[x]) for x in b)

        merges = sorted(
            (rank, ranks[t[:i]], ranks[t[i:]], text(t[:i]), text(t[i:]))
            for t, rank in ranks.items()
            for i in range(1, len(t))
            if t[:i] in ranks and t[i:] in ranks
        )
        tok = Tokenizer(models.BPE({text(t): r for t, r in ranks.items()}, [m[3:] for m in merges], fuse_unk=False))
        qwen2_pipeline(tok)  # NFC, the Qwen2 split regex, byte-level
        tok.post_processor = processors.ByteLevel(trim_offsets=False, add_prefix_space=False)
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])
        _TOKENIZER_JSON = tok.to_str()
    return _TOKENIZER_JSON


SMALL_VOCAB = 272  # 256 byte tokens, the 14 special tokens at 256..269, two spare rows


def small_tokenizer_json() -> str:
    """A byte-level tokenizer with no merges: one token per byte, then the 14 Qwen2-VL special tokens in Qwen's
    order (``<|endoftext|>`` = 256 ... ``<|video_pad|>`` = 269). For tests that need a working tokenizer but not
    the genuine one: a model over it has an embedding of 272 rows instead of 151,936."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from qwen2vl.processing.tokenizer import SPECIAL_TOKENS

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, [], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])
    return tok.to_str()


def small_config() -> qwen2vl.Qwen2VLConfig:
    """``qwen2vl.tiny()`` over :func:`small_tokenizer_json`'s vocabulary."""
    import dataclasses

    special = {"endoftext": 256, "im_end": 258, "vision_start": 265, "vision_end": 266, "image": 268, "video": 269}
    return dataclasses.replace(
        qwen2vl.tiny(vocab_size=SMALL_VOCAB), bos_token_id=special["endoftext"], pad_token_id=special["endoftext"],
        eos_token_ids=(special["im_end"], special["endoftext"]), vision_start_token_id=special["vision_start"],
        vision_end_token_id=special["vision_end"], image_token_id=special["image"], video_token_id=special["video"],
    )


def write_processor_files(path) -> None:
    """The tokenizer, chat template and preprocessor files of a Qwen2-VL-Instruct checkpoint, into ``path``."""
    from qwen2vl.processing.processor import save_processor_files

    save_processor_files(path, qwen2_tokenizer_json())


def hf_processor(path):
    """transformers' Qwen2VLProcessor for ``path`` with the PIL image backend (the one we match exactly)."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return transformers.Qwen2VLProcessor.from_pretrained(
        path, image_processor=Qwen2VLImageProcessorPil.from_pretrained(path)
    )


@contextlib.contextmanager
def loopback_server(handler):
    """An HTTP server on 127.0.0.1 (a port the OS picks) in a thread, for as long as the block runs; it stays
    quiet when a client hangs up on purpose (size caps, timeouts). Yields its base URL."""
    import threading
    from http.server import ThreadingHTTPServer

    class Quiet(ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            pass

    httpd = Quiet(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
