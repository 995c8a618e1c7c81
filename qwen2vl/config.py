"""Model configuration: frozen dataclasses, the official presets, and config.json in both hub forms.

A checkpoint's config.json comes in two shapes (REFERENCE §1):
- the original hub file: text fields at the top level, ``rope_scaling {"type": "mrope", ...}``;
- the nested form transformers >= 4.52 writes: a ``text_config`` with ``rope_parameters``.
Re-saved copies also drop most of ``vision_config`` (its keys then take the class defaults below) and
rewrite the rope type to "default", so M-RoPE is recognised by ``mrope_section``, not by a type string.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json that cannot describe a Qwen2-VL model."""


@dataclass(frozen=True)
class VisionConfig:
    """The ViT and its 2x2 patch merger. Defaults are the values every official checkpoint uses."""

    depth: int = 32
    embed_dim: int = 1280
    num_heads: int = 16
    mlp_ratio: float = 4.0
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    hidden_size: int = 3584  # merger output width = the LLM's hidden size
    hidden_act: str = "quick_gelu"
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        """Length of one flattened 3D patch: channels x frames x pixels (3*2*14*14 = 1176)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_dim(self) -> int:
        """Width of the merger input: one 2x2 window of ViT tokens concatenated."""
        return self.embed_dim * self.spatial_merge_size**2


@dataclass(frozen=True)
class TextConfig:
    """The Qwen2 decoder. ``mrope_section`` splits head_dim/2 rotary frequencies into (t, h, w) bands."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    max_position_embeddings: int = 32768
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class Qwen2VLConfig:
    vision: VisionConfig
    text: TextConfig
    tie_word_embeddings: bool = False
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int = 151643
    pad_token_id: int = 151643
    eos_token_ids: tuple[int, ...] = (151645, 151643)  # <|im_end|>, <|endoftext|> (generation_config.json)

    def __post_init__(self) -> None:
        t, v = self.text, self.vision
        if t.hidden_size % t.num_attention_heads:
            raise ConfigError(f"hidden_size {t.hidden_size} is not divisible by "
                              f"num_attention_heads {t.num_attention_heads}")
        if t.num_attention_heads % t.num_key_value_heads:
            raise ConfigError(f"num_attention_heads {t.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {t.num_key_value_heads}")
        if len(t.mrope_section) != 3 or sum(t.mrope_section) * 2 != t.head_dim:
            raise ConfigError(f"mrope_section {list(t.mrope_section)} must be 3 numbers summing to "
                              f"head_dim/2 = {t.head_dim // 2}")
        if v.embed_dim % v.num_heads or v.head_dim % 4:
            raise ConfigError(f"vision embed_dim {v.embed_dim} / num_heads {v.num_heads} must give a head_dim "
                              "divisible by 4")
        if v.hidden_size != t.hidden_size:
            raise ConfigError(f"vision_config.hidden_size {v.hidden_size} must equal "
                              f"the LLM hidden_size {t.hidden_size}")
        if v.hidden_act != "quick_gelu":
            raise ConfigError(f"vision hidden_act {v.hidden_act!r} is not supported (Qwen2-VL uses quick_gelu)")
        if t.hidden_act != "silu":
            raise ConfigError(f"text hidden_act {t.hidden_act!r} is not supported (Qwen2 uses silu)")

    # ---- config.json -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Qwen2VLConfig:
        """Read a config.json dict in the flat hub form or the nested transformers >= 4.52 form."""
        if d.get("model_type") != "qwen2_vl":
            raise ConfigError(f"config.json has model_type {d.get('model_type')!r}; expected 'qwen2_vl'")
        t = d.get("text_config") or d  # nested form, else flat
        if not isinstance(t, dict):
            raise ConfigError("config.json: text_config is not an object")
        if missing := [k for k in _REQUIRED_TEXT_KEYS if k not in t]:
            where = "text_config" if "text_config" in d else "config.json"
            raise ConfigError(f"{where} is missing required key(s): {', '.join(missing)}")

        rope = t.get("rope_parameters") or t.get("rope_scaling") or d.get("rope_scaling") or {}
        text = TextConfig(
            **{k: int(t[k]) for k in _REQUIRED_TEXT_KEYS},
            # 1e-6 is every checkpoint's value; transformers' class default 1e-5 is a trap (REFERENCE §9.12)
            rms_norm_eps=float(t.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", t.get("rope_theta", TextConfig.rope_theta))),
            mrope_section=tuple(int(x) for x in rope.get("mrope_section", TextConfig.mrope_section)),
            max_position_embeddings=int(t.get("max_position_embeddings", TextConfig.max_position_embeddings)),
            hidden_act=t.get("hidden_act", TextConfig.hidden_act),
        )

        v = d.get("vision_config") or {}
        v = {
            "in_channels": v.get("in_chans", VisionConfig.in_channels),  # the older names of two keys
            "patch_size": v.get("spatial_patch_size", VisionConfig.patch_size),
            # transformers defaults a missing merger width to 3584 (right for 7B only); the merger
            # feeds the LLM, so its width can only be the LLM's hidden size.
            "hidden_size": text.hidden_size,
            **v,
            "rope_theta": (v.get("rope_parameters") or {}).get("rope_theta", VisionConfig.rope_theta),
        }
        vision = VisionConfig(**{f.name: type(f.default)(v[f.name]) for f in fields(VisionConfig) if f.name in v})

        eos = _first(d, t, "eos_token_id", 151645)
        return cls(
            vision=vision,
            text=text,
            # before transformers v5 the flag sometimes lived only inside text_config
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False) or t.get("tie_word_embeddings", False)),
            **{k: int(_first(d, t, k, getattr(cls, k))) for k in _TOKEN_ID_KEYS},
            eos_token_ids=tuple(int(e) for e in eos) if isinstance(eos, list) else (int(eos),),
        )

    def to_dict(self) -> dict[str, Any]:
        """The flat hub form, with every vision key written out (so no reader falls back to defaults)."""
        t, v = self.text, self.vision
        return {
            "architectures": ["Qwen2VLForConditionalGeneration"],
            "model_type": "qwen2_vl",
            **{k: x for k, x in asdict(t).items() if k != "mrope_section"},  # our field names are the hub keys
            "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
            "max_window_layers": t.num_hidden_layers,
            "sliding_window": t.max_position_embeddings,
            "use_sliding_window": False,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "tie_word_embeddings": self.tie_word_embeddings,
            **{k: getattr(self, k) for k in _TOKEN_ID_KEYS},
            "eos_token_id": self.eos_token_ids[0],
            "vision_token_id": 151654,
            "vision_config": {
                **{k: x for k, x in asdict(v).items() if k != "rope_theta"},
                "mlp_ratio": v.mlp_ratio if v.mlp_ratio != int(v.mlp_ratio) else int(v.mlp_ratio),
                "in_chans": v.in_channels,
                "spatial_patch_size": v.patch_size,
            },
        }

    def generation_dict(self) -> dict[str, Any]:
        return {
            "bos_token_id": self.bos_token_id,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": list(self.eos_token_ids),
        }

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Qwen2VLConfig:
        """config.json of a checkpoint directory, with the eos ids of generation_config.json if present."""
        path = Path(path)
        d = _read_json(path / "config.json")
        if (path / "generation_config.json").exists():
            gen = _read_json(path / "generation_config.json")
            d = {**d, **{k: gen[k] for k in ("eos_token_id", "pad_token_id") if gen.get(k) is not None}}
        return cls.from_dict(d)


_REQUIRED_TEXT_KEYS = [f.name for f in fields(TextConfig) if f.default is MISSING]
_TOKEN_ID_KEYS = [f.name for f in fields(Qwen2VLConfig) if f.name.endswith("_token_id")]


def _first(d: dict[str, Any], t: dict[str, Any], key: str, default: Any) -> Any:
    """A token id from the top level, else from text_config, else the Qwen2-VL default (null counts as absent)."""
    return next((source[key] for source in (d, t) if source.get(key) is not None), default)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path} not found")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path} does not hold a JSON object")
    return d


# ---- presets: the official config.json values (REFERENCE §1.1) ----------------------------------
def _preset(hidden: int, layers: int, heads: int, kv: int, inter: int, vocab: int, tie: bool) -> Qwen2VLConfig:
    return Qwen2VLConfig(
        vision=VisionConfig(hidden_size=hidden),
        text=TextConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
        ),
        tie_word_embeddings=tie,
    )


def qwen2vl_2b() -> Qwen2VLConfig:
    return _preset(1536, 28, 12, 2, 8960, 151936, tie=True)


def qwen2vl_7b() -> Qwen2VLConfig:
    return _preset(3584, 28, 28, 4, 18944, 152064, tie=False)


def qwen2vl_72b() -> Qwen2VLConfig:
    return _preset(8192, 80, 64, 8, 29568, 152064, tie=False)


def tiny(vocab_size: int = 151936, tie_word_embeddings: bool = False) -> Qwen2VLConfig:
    """A few-MB model for tests: real token ids (so the genuine tokenizer fits), tiny widths."""
    return Qwen2VLConfig(
        vision=VisionConfig(depth=2, embed_dim=64, num_heads=4, hidden_size=128),
        text=TextConfig(
            vocab_size=vocab_size,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            mrope_section=(4, 6, 6),
        ),
        tie_word_embeddings=tie_word_embeddings,
    )


# The presets as static methods too, so ``Qwen2VLConfig.qwen2vl_2b()`` reads naturally.
for _fn in (qwen2vl_2b, qwen2vl_7b, qwen2vl_72b, tiny):
    setattr(Qwen2VLConfig, _fn.__name__, staticmethod(_fn))
