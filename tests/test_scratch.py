"""The synthetic curriculum's run (recipes/synth): from nothing, a small tokenizer with the Qwen2-VL special tokens
and a random model directory around it that our loader, the processor, chat and transformers all accept; the
three stages end to end at toy size; and `python -m recipes.synth run`'s flags."""

import pytest
import torch

import qwen2vl
from recipes.synth import curriculum
from recipes.synth.__main__ import main
from recipes.synth.scratch import init_model_dir, train_tokenizer

TEXTS = [
    "A red circle and two blue squares.",
    "What colour is the shape?",
    "red",
    "The text says KQ7.",
    "A green ball moves to the left.",
    "How many shapes are there?",
    "3",
] * 20


def test_small_tokenizer_keeps_qwen_behaviour():
    tok = train_tokenizer(TEXTS, vocab_size=300)
    vocab = tok.get_vocab_size(with_added_tokens=False)
    assert tok.token_to_id("<|endoftext|>") == vocab and tok.token_to_id("<|video_pad|>") == vocab + 13
    ids = tok.encode("<|im_start|>user\nWhat colour is the shape?<|im_end|> 1234").ids
    assert ids[0] == vocab + 1 and vocab + 2 in ids
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nWhat colour is the shape?<|im_end|> 1234"
    digits = tok.encode("1234").ids
    assert len(digits) == 4  # digits one by one, as Qwen2


def test_init_model_dir_is_a_complete_checkpoint(tmp_path):
    path = init_model_dir(tmp_path / "m", TEXTS, vocab_size=300)
    assistant = qwen2vl.load(path)
    cfg = assistant.model.config
    assert cfg.text.vocab_size == assistant.processor.tokenizer.__len__()
    assert assistant.processor.image_token_id == cfg.image_token_id
    from PIL import Image

    picture = {"type": "image", "image": Image.new("RGB", (60, 60))}
    answer = assistant.chat([{"role": "user", "content": [picture, {"type": "text", "text": "What colour?"}]}],
                            max_new_tokens=3)
    assert isinstance(answer, str)
    import transformers

    ref = transformers.Qwen2VLForConditionalGeneration.from_pretrained(path).eval()
    ours = qwen2vl.Qwen2VL.from_pretrained(path)
    ids = torch.tensor([[5, 7, 9, 11]])
    with torch.no_grad():
        assert (ours(ids) - ref(input_ids=ids).logits).abs().max() < 1e-4
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size < 40 * 2**20


def test_a_failing_stage_stops_the_curriculum_naming_it(tmp_path, capfd):
    """Each stage trains in a process of its own: its error shows, and the curriculum stops with one naming the
    stage instead of going on to the next."""
    from recipes.synth.curriculum import Curriculum, run

    out = tmp_path / "cur"
    with pytest.raises(RuntimeError, match=f"training into {out / 'stage1'} failed"):
        run(Curriculum(out=str(out), train_examples=12, test_examples=6, steps=(1, 1, 1), batch_tokens=16,
                       focus_steps=0, warmup_steps=0))
    assert "exceed batch_tokens=16" in capfd.readouterr().err  # the stage's own error, from its process
    assert not (out / "stage1-model").exists() and not (out / "stage2").exists()


def test_curriculum_tokenizer_and_pipeline(tmp_path):
    """The run end to end at toy size: data -> tokenizer and model -> stages 1-3 -> eval. Its tokenizer spends one
    token per word of the chat template and one per OCR character."""
    import json

    from qwen2vl.processing.tokenizer import Tokenizer
    from recipes.synth.curriculum import Curriculum, _texts, run

    out = tmp_path / "cur"
    c = Curriculum(out=str(out), train_examples=48, test_examples=12, steps=(2, 2, 2), batch_tokens=1024,
                   warmup_steps=1, focus_steps=2)
    report = run(c)
    assert set(report["tasks"]) == {"colour", "shape", "counting", "grounding", "ocr", "direction"}
    assert sum(t["n"] for t in report["tasks"].values()) == 12
    assert list(report["train_seconds"]) == ["stage1", "stage2-focus", "stage2", "stage3", "total"]
    focus_state = json.loads((out / "stage2-focus" / "checkpoint-2" / "trainer_state.json").read_text())
    assert focus_state["config"]["model"] == str(out / "stage1-model")  # the reading focus follows stage 1
    focus = [json.loads(line) for line in (out / "data" / "focus.jsonl").read_text().splitlines()]
    assert focus and {r["task"] for r in focus} == {"ocr"}  # stage 2 opens with the reading conversations alone
    assert (out / "stage2-focus" / "checkpoint-2" / "trainer_state.json").is_file()
    assert (out / "stage2-focus-model" / "model.safetensors").is_file()
    assert json.loads((out / "eval.json").read_text())["tasks"] == report["tasks"]
    for stage in (1, 2, 3):
        assert (out / f"stage{stage}-model" / "tokenizer.json").is_file()
    clips = len(list((data := out / "data").glob("videos/train-*.mp4")))  # decoded once, read back by later stages
    assert clips and len(list((out / "cache" / "videos").rglob("*.clip"))) == clips
    stage3 = json.loads((out / "stage3" / "checkpoint-2" / "trainer_state.json").read_text())["config"]
    assert stage3["video_cache"] == str(out / "cache" / "videos")
    assert stage3["data"] == str(data / "stage3.jsonl")  # one box question per conversation
    assert len((data / "stage3.jsonl").read_text().splitlines()) > len((data / "train.jsonl").read_text().splitlines())
    shipped = qwen2vl.Qwen2VL.from_pretrained(out / "model")  # what is evaluated: the last stage, in bfloat16
    assert {p.dtype for p in shipped.parameters()} == {torch.bfloat16}
    video = json.loads((out / "model" / "video_preprocessor_config.json").read_text())  # the clips' settings
    assert (video["min_pixels"], video["max_pixels"]) == (4 * 28 * 28, 768 * 28 * 28)
    tok = Tokenizer.from_file(out / "init" / "tokenizer.json")
    header = tok.encode("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert len(header) <= 14  # 3 specials, then a token per word or newline (48 when spelt out)
    ocr = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    ocr = [r["messages"][1]["content"] for r in ocr if r["task"] == "ocr"]
    assert ocr and all(len(tok.encode(a)) == len(a) for a in ocr)  # one token per character
    corpus = "\n".join(_texts([data / "pretrain.jsonl", data / "train.jsonl"]))
    lettered = [a for a in ocr if sum(c.isalpha() for c in a) >= 2]  # all-digit ones could be in a box
    assert lettered and not any(a in corpus for a in lettered) and "<|" not in corpus


def picture_logits_match_transformers(path, grid: list[int], seed: int):
    """Our logits for a prompt holding one random picture of ``grid`` (t, h, w patches), asserted equal to
    transformers' for the same checkpoint; returns (our model, its inputs, the logits)."""
    import transformers

    ours = qwen2vl.Qwen2VL.from_pretrained(path)
    ref = transformers.Qwen2VLForConditionalGeneration.from_pretrained(path).eval()
    c = ours.config
    grid = torch.tensor([grid])
    tokens = int(grid.prod()) // 4
    ids = torch.tensor([[5, 7, c.vision_start_token_id] + [c.image_token_id] * tokens + [c.vision_end_token_id, 9, 11]])
    pv = torch.randn(tokens * 4, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        o = ours(ids, None, pv, grid)
        r = ref(input_ids=ids, pixel_values=pv, image_grid_thw=grid, mm_token_type_ids=(ids == c.image_token_id).long())
    assert (o - r.logits).abs().max() < 1e-4
    return ours, (ids, None, pv, grid), o


def test_a_small_rope_theta_reaches_transformers_through_config_json(tmp_path):
    """The curriculum's models turn M-RoPE at a small rope_theta (not 1e6, at which a picture's columns are one place to
    the LLM); config.json carries it, and transformers computes the same logits with a picture in the prompt, whose
    height and width positions are what it changes."""
    import json

    path = init_model_dir(tmp_path / "m", TEXTS, vocab_size=300, rope_theta=50.0)
    assert json.loads((path / "config.json").read_text())["rope_theta"] == 50.0
    ours, inputs, o = picture_logits_match_transformers(path, [1, 6, 8], seed=0)  # 3 x 4 merged tokens
    theta_1e6 = qwen2vl.Qwen2VL.from_pretrained(init_model_dir(tmp_path / "d", TEXTS, vocab_size=300))
    theta_1e6.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert (theta_1e6(*inputs) - o).abs().max() > 1e-3  # the same weights, other positions


def test_an_mrope_section_reaches_transformers_through_config_json(tmp_path):
    """small_config's mrope_section (how many rotary frequencies turn with each of t, h, w) lands in config.json;
    transformers computes the same logits from it with a picture in the prompt, and the same weights under the
    default split give others. A split that does not add up to head_dim/2 is refused, naming it."""
    import json

    path = init_model_dir(tmp_path / "m", TEXTS, vocab_size=300, rope_theta=50.0, mrope_section=(4, 8, 20))
    assert json.loads((path / "config.json").read_text())["rope_scaling"]["mrope_section"] == [4, 8, 20]
    # 2 x 5 merged tokens: height and width positions differ
    ours, inputs, o = picture_logits_match_transformers(path, [1, 4, 10], seed=1)
    default = qwen2vl.Qwen2VL.from_pretrained(init_model_dir(tmp_path / "d", TEXTS, vocab_size=300, rope_theta=50.0))
    assert default.config.text.mrope_section == (8, 12, 12)
    default.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert (default(*inputs) - o).abs().max() > 1e-3
    with pytest.raises(qwen2vl.ConfigError, match="mrope_section"):
        init_model_dir(tmp_path / "bad", TEXTS, vocab_size=300, mrope_section=(4, 8, 8))
    assert not (tmp_path / "bad").exists()


def test_run_flags_reach_the_curriculum(monkeypatch):
    """Every `python -m recipes.synth run` flag lands in the Curriculum it runs, and no flag means the dataclass
    defaults: those of the shipped model."""
    seen = []
    monkeypatch.setattr(curriculum, "run", lambda c: seen.append(c) or {})
    assert main(["run", "--out", "x"]) == 0
    assert seen[-1] == curriculum.Curriculum(out="x")
    default = curriculum.Curriculum(out="")
    assert default.model == {"rope_theta": 1000.0, "mrope_section": (2, 6, 24), "kv_heads": 4}
    assert (default.steps, default.lr, default.focus_steps, default.dtype) == (
        (100, 2700, 1200), (3e-4, 1e-3, 5e-4), 400, "bfloat16"
    )
    args = ["run", "--out", "y", "--seed", "3", "--steps", "1", "2", "3", "--lr", "1e-3", "2e-3", "3e-3"]
    args += ["--focus-steps", "5", "--focus-lr", "4e-4", "--train-examples", "10", "--test-examples", "6"]
    args += ["--dtype", "float32", "--rope-theta", "1e6", "--mix", "shape=2,ocr=1", "--mrope-section", "4", "8", "20"]
    assert main([*args, "--kv-heads", "2", "--batch-tokens", "512", "--warmup-steps", "0"]) == 0
    c = seen[-1]
    assert (c.seed, c.steps, c.lr, c.focus_steps, c.focus_lr, c.train_examples, c.test_examples) == (
        3, (1, 2, 3), (1e-3, 2e-3, 3e-3), 5, 4e-4, 10, 6
    )
    assert (c.mix, c.dtype, c.batch_tokens, c.warmup_steps) == ({"shape": 2.0, "ocr": 1.0}, "float32", 512, 0)
    assert c.model == {"rope_theta": 1e6, "mrope_section": (4, 8, 20), "kv_heads": 2}


def test_run_refuses_kv_heads_that_do_not_divide_the_heads(monkeypatch, capsys):
    monkeypatch.setattr(curriculum, "run", lambda c: pytest.fail("ran"))
    with pytest.raises(SystemExit):
        main(["run", "--out", "x", "--kv-heads", "3"])
    assert "--kv-heads: invalid choice: 3" in capsys.readouterr().err


def test_the_run_mix_reaches_the_data(monkeypatch, tmp_path):
    class Stop(Exception):
        pass

    def fake(out, seed, train, test, *, mix=None):
        raise Stop(seed, train, test, mix)

    monkeypatch.setattr(curriculum, "synthesize", fake)
    with pytest.raises(Stop) as stopped:
        curriculum.run(curriculum.Curriculum(out=str(tmp_path), mix={"shape": 2.0}))
    assert stopped.value.args == (0, 30000, 1200, {"shape": 2.0})
