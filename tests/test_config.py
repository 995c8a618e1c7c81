"""Presets against the paper's Table 1 (counted on the meta device) and config.json in both forms."""

import json

import pytest
import torch

import qwen2vl
from qwen2vl import ConfigError, Qwen2VL, Qwen2VLConfig

TABLE1 = {
    # total, visual (ViT + merger), LLM incl. embeddings + untied head, hub tensor count
    "qwen2vl_2b": (2_208_985_600, 665_271_296, 1_543_714_304, 729),
    "qwen2vl_7b": (8_291_375_616, 675_759_104, 7_615_616_512, 730),
    "qwen2vl_72b": (73_405_560_320, 699_356_672, 72_706_203_648, 1354),
}


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # shared (tied) parameters counted once


@pytest.mark.parametrize("name", TABLE1)
def test_presets_reproduce_table1(name):
    total, visual, llm, n_tensors = TABLE1[name]
    with torch.device("meta"):
        m = Qwen2VL(getattr(qwen2vl, name)())
    assert count(m) == total
    assert count(m.visual) == visual
    assert count(m) - count(m.visual) == llm
    saved = len(m.state_dict()) - m.config.tie_word_embeddings  # the 2B head is tied, not stored
    assert saved == n_tensors
    assert Qwen2VLConfig.qwen2vl_7b() == qwen2vl.qwen2vl_7b()


def test_paper_vit_is_675m_and_llm_sizes():
    with torch.device("meta"):
        sizes = {n: Qwen2VL(getattr(qwen2vl, n)()) for n in TABLE1}
    assert round(count(sizes["qwen2vl_7b"].visual) / 1e6) == 676  # "675M" in the paper
    assert [round((count(m) - count(m.visual)) / 1e9, 1) for m in sizes.values()] == [1.5, 7.6, 72.7]


HUB_2B = {  # the original hub file (transformers_version 4.41.2): flat, rope type "mrope"
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "model_type": "qwen2_vl",
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 1536,
    "initializer_range": 0.02,
    "intermediate_size": 8960,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "num_attention_heads": 12,
    "num_hidden_layers": 28,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.41.2",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32,
        "embed_dim": 1280,
        "mlp_ratio": 4,
        "num_heads": 16,
        "in_chans": 3,
        "hidden_size": 1536,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 151936,
}


def test_original_hub_file_gives_the_2b_preset():
    c = Qwen2VLConfig.from_dict(HUB_2B)
    assert c.vision == qwen2vl.qwen2vl_2b().vision and c.text == qwen2vl.qwen2vl_2b().text
    assert c.tie_word_embeddings


def test_resaved_copy_traps():
    """Re-saved copies: rope type 'default' (mrope_section kept), vision keys mostly gone (hidden_act
    and hidden_size absent), no rms_norm_eps."""
    d = {k: v for k, v in HUB_2B.items() if k != "rms_norm_eps"}
    d["rope_scaling"] = {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"}
    d["vision_config"] = {"in_chans": 3, "model_type": "qwen2_vl", "spatial_patch_size": 14}
    c = Qwen2VLConfig.from_dict(d)
    assert c.text.mrope_section == (16, 24, 24)
    assert c.text.rms_norm_eps == 1e-6  # not transformers' class default 1e-5
    assert c.vision.hidden_size == 1536  # not transformers' class default 3584 (7B only)
    assert c.vision.hidden_act == "quick_gelu" and c.vision.depth == 32


def test_nested_form_written_by_transformers(tmp_path):
    import transformers

    ours = qwen2vl.tiny(tie_word_embeddings=True)
    transformers.Qwen2VLConfig(**ours.to_dict()).save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    assert "text_config" in d and "rope_parameters" in d["text_config"]  # really the nested form
    assert Qwen2VLConfig.from_dict(d).text == ours.text
    assert Qwen2VLConfig.from_dict(d).vision == ours.vision
    assert Qwen2VLConfig.from_dict(d).tie_word_embeddings


def test_round_trip():
    for c in (qwen2vl.qwen2vl_2b(), qwen2vl.qwen2vl_72b(), qwen2vl.tiny()):
        back = Qwen2VLConfig.from_dict(c.to_dict())
        assert (back.vision, back.text, back.tie_word_embeddings) == (c.vision, c.text, c.tie_word_embeddings)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "llava"}, "model_type 'llava'; expected 'qwen2_vl'"),
        ({"hidden_size": None}, "missing required key\\(s\\): hidden_size"),
        ({"num_key_value_heads": None, "vocab_size": None}, "vocab_size, num_key_value_heads"),
        ({"rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 25]}}, "mrope_section \\[16, 24, 25\\]"),
        ({"num_key_value_heads": 5}, "not a multiple of num_key_value_heads 5"),
    ],
)
def test_bad_configs_are_named(change, message):
    d = {k: v for k, v in HUB_2B.items() if change.get(k, 0) is not None}
    d.update({k: v for k, v in change.items() if v is not None})
    with pytest.raises(ConfigError, match=message):
        Qwen2VLConfig.from_dict(d)


def test_configs_are_frozen():
    c = qwen2vl.tiny()
    with pytest.raises(Exception):
        c.text.hidden_size = 3  # type: ignore[misc]


def test_token_ids_and_generation_config(tmp_path):
    d = {**HUB_2B, "pad_token_id": 0, "bos_token_id": None}
    c = Qwen2VLConfig.from_dict(d)
    assert (c.pad_token_id, c.bos_token_id, c.eos_token_ids) == (0, 151643, (151645,))  # 0 is a real id
    (tmp_path / "config.json").write_text(json.dumps(HUB_2B))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643], "pad_token_id": 151643}))
    c = Qwen2VLConfig.from_pretrained(tmp_path)
    assert c.eos_token_ids == (151645, 151643) and c.pad_token_id == 151643
