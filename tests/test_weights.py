"""Checkpoint loading and saving: both key layouts, hub-layout saving that transformers reads back,
shards, dtypes, and a one-line error naming the problem for each kind of bad checkpoint."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import qwen2vl
from helpers import make_reference, pixels, prompt, ref_logits
from qwen2vl import CheckpointError, Qwen2VL
from qwen2vl.weights import from_hub_name, to_hub_name


def inputs():
    ids, ig, vg = prompt(11, ("image", 1, 4, 6), 12, ("video", 2, 4, 4), 13)
    return torch.tensor([ids]), pixels(ig, 1176), ig, pixels(vg, 1176, 2), vg


def same_weights(a: Qwen2VL, b: Qwen2VL) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_key_table_round_trips():
    for name in ("visual.blocks.0.attn.qkv.weight", "model.layers.3.mlp.up_proj.weight", "lm_head.weight"):
        assert to_hub_name(from_hub_name(name)) == name
    assert from_hub_name("visual.merger.ln_q.bias") == "model.visual.merger.ln_q.bias"
    assert to_hub_name("model.language_model.norm.weight") == "model.norm.weight"


def test_both_layouts_load_to_identical_weights(tiny_dir, tmp_path):
    src, _ = tiny_dir
    state = load_file(src / "model.safetensors")
    assert any(k.startswith("visual.") for k in state)  # transformers saves the hub layout
    newer = tmp_path / "newer"
    shutil.copytree(src, newer)
    save_file({from_hub_name(k): v for k, v in state.items()}, newer / "model.safetensors", metadata={"format": "pt"})
    assert any(k.startswith("model.language_model.") for k in load_file(newer / "model.safetensors"))
    assert same_weights(Qwen2VL.from_pretrained(src), Qwen2VL.from_pretrained(newer))


def test_saved_directory_loads_in_transformers_with_identical_logits(tiny, tmp_path):
    import transformers

    tiny.save_pretrained(tmp_path)
    assert set(load_file(tmp_path / "model.safetensors")) == set(tiny.state_dict())
    ref = transformers.Qwen2VLForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids, pv, ig, pvv, vg = inputs()
    r = ref_logits(ref, ids, None, pv, ig, pvv, vg)
    with torch.no_grad():
        o = tiny(ids, None, pv, ig, pvv, vg)
    assert (o - r).abs().max() < 1e-4
    assert same_weights(tiny, Qwen2VL.from_pretrained(tmp_path))  # and back again, bit-exact


def test_tied_head_2b_style(tmp_path):
    ref = make_reference(qwen2vl.tiny(tie_word_embeddings=True), tmp_path / "ref", seed=3)
    assert "lm_head.weight" not in load_file(tmp_path / "ref" / "model.safetensors")
    m = Qwen2VL.from_pretrained(tmp_path / "ref")
    assert m.lm_head.weight is m.model.embed_tokens.weight
    ids, pv, ig, pvv, vg = inputs()
    r = ref_logits(ref, ids, None, pv, ig, pvv, vg)
    with torch.no_grad():
        assert (m(ids, None, pv, ig, pvv, vg) - r).abs().max() < 1e-4
    m.save_pretrained(tmp_path / "ours")
    assert "lm_head.weight" not in load_file(tmp_path / "ours" / "model.safetensors")


def test_shards_with_index(tiny, tmp_path):
    tiny.save_pretrained(tmp_path, max_shard_size=20 * 2**20)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and not (tmp_path / "model.safetensors").exists()
    assert same_weights(tiny, Qwen2VL.from_pretrained(tmp_path))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, "bfloat16"])
def test_dtype_on_load(tiny_dir, dtype):
    m = Qwen2VL.from_pretrained(tiny_dir[0], dtype=dtype)
    want = dtype if isinstance(dtype, torch.dtype) else torch.bfloat16
    assert {p.dtype for p in m.parameters()} == {want}
    ids, pv, ig, pvv, vg = inputs()
    with torch.no_grad():
        out = m(ids, None, pv, ig, pvv, vg)
    assert out.dtype == want and torch.isfinite(out).all()


def test_built_on_meta_with_no_leftover(tiny):
    assert all(p.device.type == "cpu" for p in tiny.parameters())
    assert not list(tiny.buffers())  # nothing to re-create after meta loading


# ---- bad checkpoints: one line, naming the problem -----------------------------------------------
def broken(tiny_dir, tmp_path, how: str):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_dir[0], d)
    f = d / "model.safetensors"
    if how == "missing_weights":
        f.unlink()
    elif how == "truncated":
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
    elif how == "truncated_header":
        f.write_bytes(f.read_bytes()[:100])
    elif how in ("missing_key", "unexpected_key", "wrong_shape"):
        state = load_file(f)
        if how == "missing_key":
            del state["model.layers.1.mlp.up_proj.weight"]
        elif how == "unexpected_key":
            state["model.layers.9.mlp.up_proj.weight"] = torch.zeros(2)
        else:
            state["visual.blocks.0.attn.qkv.bias"] = torch.zeros(7)
        save_file(state, f, metadata={"format": "pt"})
    elif how == "unknown_model_type":
        c = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**c, "model_type": "qwen2_5_vl"}))
    elif how == "missing_config":
        (d / "config.json").unlink()
    elif how == "bad_json":
        (d / "config.json").write_text("{not json")
    return d


BAD = {
    "missing_weights": "no model.safetensors or model.safetensors.index.json in",
    "truncated": "model.safetensors is not a readable safetensors file",
    "truncated_header": "model.safetensors is not a readable safetensors file",
    "missing_key": "missing 1 tensor\\(s\\): model.layers.1.mlp.up_proj.weight",
    "unexpected_key": "unexpected tensor\\(s\\) in .*: model.layers.9.mlp.up_proj.weight",
    "wrong_shape": "tensor visual.blocks.0.attn.qkv.bias has shape \\(7,\\) but the config needs \\(192,\\)",
    "unknown_model_type": "model_type 'qwen2_5_vl'; expected 'qwen2_vl'",
    "missing_config": "config.json not found",
    "bad_json": "config.json is not valid JSON",
}


@pytest.mark.parametrize("how", BAD)
def test_bad_checkpoint_gives_one_line_error(tiny_dir, tmp_path, how):
    d = broken(tiny_dir, tmp_path, how)
    with pytest.raises(CheckpointError, match=BAD[how]) as e:
        Qwen2VL.from_pretrained(d)
    assert "\n" not in str(e.value)


def test_missing_directory_and_shard(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Qwen2VL.from_pretrained(tmp_path / "nope")
    tiny.save_pretrained(tmp_path / "sharded", max_shard_size=20 * 2**20)
    (tmp_path / "sharded" / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard model-00002-of-00003.safetensors listed in"):
        Qwen2VL.from_pretrained(tmp_path / "sharded")


def test_save_is_atomic(tiny_dir, tmp_path, monkeypatch):
    """A crash while writing leaves the previous checkpoint intact and no temporary files behind."""
    import qwen2vl.weights as w

    m = Qwen2VL.from_pretrained(tiny_dir[0])
    m.save_pretrained(tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()

    def crash(*a, **k):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(w, "save_file", crash)
    with torch.no_grad():
        m.lm_head.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        m.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]


def test_tie_weights_after_to_empty():
    with torch.device("meta"):
        m = Qwen2VL(qwen2vl.tiny(tie_word_embeddings=True))
    m = m.to_empty(device="cpu")
    assert m.lm_head.weight is not m.model.embed_tokens.weight  # to_empty unties
    m.tie_weights()
    assert m.lm_head.weight is m.model.embed_tokens.weight
