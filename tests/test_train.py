"""The training loop on the tiny checkpoint: accumulation equals one bigger batch, a SIGKILLed run resumes onto
the same loss curve, export loads in transformers, the model learns, torchrun with 2 processes matches one
process (and does not hang when one rank has no image), and `qwen2vl data check`."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import qwen2vl
from qwen2vl.cli import main
from qwen2vl.train.loop import TrainConfig, lr_factor, train

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Image-question pairs (one answer word per colour) plus a text-only record, and a ShareGPT one."""
    d = tmp_path_factory.mktemp("data")
    records = []
    for name, rgb in COLOURS.items():
        Image.new("RGB", (56, 56), rgb).save(d / f"{name}.png")
        records.append({"messages": [
            {"role": "user", "content": [{"type": "image", "image": f"{name}.png"},
                                         {"type": "text", "text": "What colour is this?"}]},
            {"role": "assistant", "content": name}]})  # fmt: skip
    records.append({"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]})
    records.append({"conversations": [{"from": "human", "value": "<image>Colour?"}, {"from": "gpt", "value": "red"}],
                    "images": ["red.png"]})  # fmt: skip
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return d / "train.jsonl"


def config(small_checkpoint, dataset, out, **kw):
    base = dict(stage=2, model=str(small_checkpoint), data=str(dataset), out=str(out), max_steps=4,
                batch_tokens=256, lr=1e-3, progress=False, save_every=100)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def weights(out):
    model = qwen2vl.Qwen2VL.from_pretrained(out / (out / "latest").read_text())
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_recipe_then_flags(tmp_path):
    (tmp_path / "r.yaml").write_text("stage: 3\nmodel: base\ndata: d.jsonl\nout: o\nlr: 0.0001\nmax_steps: 7\n")
    cfg = TrainConfig.from_recipe(str(tmp_path / "r.yaml"), lr=0.01, max_steps=None)
    assert (cfg.stage, cfg.lr, cfg.max_steps) == (3, 0.01, 7)
    (tmp_path / "bad.yaml").write_text("stage: 3\nlearning_rate: 1\n")
    with pytest.raises(ValueError, match="unknown training settings \\['learning_rate'\\]"):
        TrainConfig.from_recipe(str(tmp_path / "bad.yaml"))
    with pytest.raises(ValueError, match="missing training settings: model, data, out"):
        TrainConfig.from_recipe(None, stage=1)


def test_overlong_samples_are_counted_and_fail_past_the_threshold(small_checkpoint, dataset, tmp_path, capsys):
    with pytest.raises(ValueError, match="4 of 6 samples exceed batch_tokens=80"):
        train(config(small_checkpoint, dataset, tmp_path / "o", batch_tokens=80))
    train(config(small_checkpoint, dataset, tmp_path / "o", batch_tokens=80, max_overlong=0.9, max_steps=1))
    assert "4 of 6 samples are longer than batch_tokens=80 and are left out" in capsys.readouterr().err


def test_lr_schedule():
    cfg = TrainConfig(stage=3, model="m", data="d", out="o", max_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0) and lr_factor(100, cfg) == pytest.approx(0.1)
    assert lr_factor(55, cfg) == pytest.approx(0.55)


def test_a_short_run_leaves_its_warmup(small_checkpoint, dataset, tmp_path):
    """By default the warmup is a tenth of the run (at most 10 steps): a 6-step run used to spend all its steps in
    a 10-step warmup. A warmup set longer than the run is refused before anything loads."""
    short = TrainConfig(stage=3, model="m", data="d", out="o", max_steps=6)
    assert lr_factor(0, short) == pytest.approx(1.0) and lr_factor(5, short) < lr_factor(1, short)
    assert lr_factor(9, TrainConfig(stage=3, model="m", data="d", out="o", max_steps=1000)) == pytest.approx(1.0)
    assert lr_factor(4, TrainConfig(stage=3, model="m", data="d", out="o", max_steps=50)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"warmup_steps \(10\) must be below max_steps \(6\)"):
        train(config(small_checkpoint, dataset, tmp_path / "w", max_steps=6, warmup_steps=10))


def test_accumulation_equals_one_bigger_batch(small_checkpoint, dataset, tmp_path):
    """All 6 samples in one packed row vs one sample per row accumulated over 6 rows: the same step."""
    one = train(config(small_checkpoint, dataset, tmp_path / "one", max_steps=2, batch_tokens=4096))
    many = train(config(small_checkpoint, dataset, tmp_path / "many", max_steps=2, batch_tokens=100, rows_per_step=6))
    assert [m["loss"] for m in one] == pytest.approx([m["loss"] for m in many], rel=1e-5)
    assert one[0]["grad_norm"] == pytest.approx(many[0]["grad_norm"], rel=1e-5)  # the same gradient
    # Adam divides by sqrt(v): where a gradient is ~0, float noise between the two sums moves a weight by up to
    # a fraction of lr (1e-3), so the weights agree to that, not to 1e-6
    a, b = weights(tmp_path / "one"), weights(tmp_path / "many")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 5e-4


def test_stage_presets_freeze_what_they_should(small_checkpoint, dataset, tmp_path):
    before = qwen2vl.Qwen2VL.from_pretrained(small_checkpoint).state_dict()
    train(config(small_checkpoint, dataset, tmp_path / "s3", stage=3, max_steps=1))
    after = weights(tmp_path / "s3")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not any(k.startswith("visual.blocks") or k.startswith("visual.patch_embed") for k in changed)
    assert any(k.startswith("visual.merger") for k in changed) and any(k.startswith("model.layers") for k in changed)
    train(config(small_checkpoint, dataset, tmp_path / "s1", stage=1, max_steps=1))
    changed = {k for k in before if not torch.equal(before[k], weights(tmp_path / "s1")[k])}
    assert changed and all(k.startswith("visual.") for k in changed)


def test_metrics_and_export(small_checkpoint, dataset, tmp_path, tiny_ref):
    out = tmp_path / "run"
    train(config(small_checkpoint, dataset, out, max_steps=3, save_every=2))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert set(lines[0]) == {"step", "loss", "lr", "grad_norm", "tokens", "seconds"}
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert main(["export", str(out), str(tmp_path / "exported")]) == 0
    import transformers

    ours = qwen2vl.Qwen2VL.from_pretrained(tmp_path / "exported")
    ref = transformers.Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "exported").eval()
    ids = torch.tensor([[257, 84, 82, 68, 81, 198, 258]])  # <|im_start|>user\n<|im_end|>
    with torch.no_grad():
        assert (ours(ids) - ref(input_ids=ids).logits).abs().max() < 1e-4
    assert qwen2vl.load(tmp_path / "exported").chat("hi", max_new_tokens=2) is not None
    assert main(["export", str(out), str(tmp_path / "half"), "--dtype", "bfloat16"]) == 0  # the weights halved
    half = qwen2vl.Qwen2VL.from_pretrained(tmp_path / "half", dtype=None)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    for (name, a), b in zip(ours.state_dict().items(), half.state_dict().values()):
        assert torch.equal(a.to(torch.bfloat16), b), name
    tokenizer = (tmp_path / "exported" / "tokenizer.json").read_bytes()
    assert (tmp_path / "half" / "tokenizer.json").read_bytes() == tokenizer


def run_cli(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "qwen2vl", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)  # fmt: skip


def test_sigkill_then_resume_gives_the_same_loss_curve(small_checkpoint, dataset, tmp_path):
    common = ["--stage", "2", "--model", str(small_checkpoint), "--data", str(dataset), "--batch-tokens", "256",
              "--rows-per-step", "2", "--lr", "1e-3", "--max-steps", "20", "--save-every", "3", "--no-progress"]  # fmt: skip
    whole = run_cli([*common, "--out", str(tmp_path / "whole")])
    assert whole.wait(timeout=300) == 0, whole.stderr.read()
    out = tmp_path / "killed"
    proc = run_cli([*common, "--out", str(out)])
    metrics = out / "metrics.jsonl"
    while proc.poll() is None and (not metrics.exists() or len(metrics.read_text().splitlines()) < 8):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = len(metrics.read_text().splitlines())
    resumed = run_cli([*common, "--out", str(out), "--resume"])
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert "resuming from" in resumed.stderr.read()
    a = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [m["step"] for m in b] == list(range(1, 21)) and killed_at < 20
    assert [m["loss"] for m in a] == pytest.approx([m["loss"] for m in b], abs=1e-6)


def test_the_tiny_model_learns(small_checkpoint, dataset, tmp_path):
    history = train(config(small_checkpoint, dataset, tmp_path / "learn", max_steps=60, lr=3e-3, warmup_steps=5,
                           batch_tokens=4096))  # fmt: skip
    assert history[0]["loss"] > 5 and history[-1]["loss"] < 0.05


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(small_checkpoint, dataset, tmp_path, parallel):
    """torchrun, gloo, 2 processes x 1 row == 1 process x 2 rows: the same global batches. Rows hold one sample
    each, so some steps give one rank the text-only sample and no image: it must not hang."""
    common = ["--stage", "2", "--model", str(small_checkpoint), "--data", str(dataset), "--batch-tokens", "100",
              "--lr", "1e-3", "--max-steps", "4", "--no-progress"]  # fmt: skip
    single = run_cli([*common, "--out", str(tmp_path / "one"), "--rows-per-step", "2"])
    assert single.wait(timeout=300) == 0, single.stderr.read()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    dist = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "qwen2vl", "train", *common, "--out", str(tmp_path / "two"), "--rows-per-step", "1",
                           "--parallel", parallel],
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert dist.returncode == 0, dist.stderr[-3000:]
    a = [json.loads(x)["loss"] for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x)["loss"] for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 4 and a == pytest.approx(b, abs=1e-5)


def test_data_check(small_checkpoint, dataset, tmp_path, capsys):
    assert main(["data", "check", str(dataset), "--model", str(small_checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "6 of 6 records usable" in out and "[[red<|im_end|>]]" in out and "<|image_pad|>x4" in out
    bad = tmp_path / "bad.jsonl"
    bad.write_text(dataset.read_text() + json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image", "image": "nope.png"}]}, {"role": "assistant", "content": "x"}]}) + "\n"
        + json.dumps({"conversations": [{"from": "human", "value": "<image><image>"}], "images": ["red.png"]})
        + "\n")  # fmt: skip
    import shutil

    for name in COLOURS:
        shutil.copy(dataset.parent / f"{name}.png", tmp_path / f"{name}.png")
    assert main(["data", "check", str(bad), "--model", str(small_checkpoint)]) == 1
    out = capsys.readouterr().out
    assert "bad.jsonl:7" in out and "no such file" in out
    assert "bad.jsonl:8" in out and "more <image> placeholders" in out and "6 of 8 records usable" in out


def test_bf16_autocast_checkpointing_and_tensorboard(small_checkpoint, dataset, tmp_path):
    plain = train(config(small_checkpoint, dataset, tmp_path / "plain", max_steps=2))
    recomputed = train(config(small_checkpoint, dataset, tmp_path / "ckpt", max_steps=2, activation_checkpointing=True,
                              tensorboard=True))  # fmt: skip
    assert [m["loss"] for m in recomputed] == pytest.approx([m["loss"] for m in plain], rel=1e-5)
    assert any((tmp_path / "ckpt" / "tensorboard").glob("events.out.tfevents.*"))
    bf16 = train(config(small_checkpoint, dataset, tmp_path / "bf16", max_steps=2, dtype="bfloat16"))
    assert [m["loss"] for m in bf16] == pytest.approx([m["loss"] for m in plain], rel=2e-2)
    assert bf16[0]["loss"] != plain[0]["loss"]  # it did run in bf16


def test_the_device_is_chosen_or_refused_by_name(small_checkpoint, dataset, tmp_path, capsys):
    from qwen2vl.train.distributed import pick_device

    assert pick_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="'banana'"):
        pick_device("banana")
    args = ["train", "--stage", "2", "--model", str(small_checkpoint), "--data", str(dataset), "--max-steps", "1",
            "--no-progress"]  # fmt: skip
    if not torch.cuda.is_available():  # asking for a GPU that is not there: one line, before any work
        assert main([*args, "--out", str(tmp_path / "gpu"), "--device", "cuda"]) == 1
        assert "'cuda' was asked for, but torch sees no GPU" in capsys.readouterr().err
        assert not (tmp_path / "gpu").exists()
    assert main([*args, "--out", str(tmp_path / "cpu"), "--device", "cpu"]) == 0
    assert (tmp_path / "cpu" / "latest").exists()


def test_turn_loss_weighting(small_checkpoint, tmp_path, capsys):
    """--loss-weighting turn: every reply here is three bytes and <|im_end|> (4 tokens), so the mean over replies
    is the token mean and training takes the same steps (the window's normaliser is right); a bad name fails
    first. (Replies of different lengths: test_train_data.py.)"""
    dataset = tmp_path / "even.jsonl"
    dataset.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant",
                       "content": a}]}) + "\n" for q, a in [("Say hi.", "hey"), ("Say red.", "red"),
                                                             ("No?", "nah")]))  # fmt: skip
    token = train(config(small_checkpoint, dataset, tmp_path / "token", max_steps=3, batch_tokens=4096))
    turn = train(config(small_checkpoint, dataset, tmp_path / "turn", max_steps=3, batch_tokens=4096,
                        loss_weighting="turn"))  # fmt: skip
    assert [m["loss"] for m in turn] == pytest.approx([m["loss"] for m in token], rel=1e-5)
    assert turn[2]["loss"] < turn[0]["loss"]
    with pytest.raises(ValueError, match="loss_weighting must be 'token' or 'turn', got 'reply'"):
        train(config(small_checkpoint, dataset, tmp_path / "bad", loss_weighting="reply"))
    assert not (tmp_path / "bad").exists()
    args = ["train", "--stage", "2", "--model", str(small_checkpoint), "--data", str(dataset), "--max-steps", "1",
            "--no-progress", "--loss-weighting", "turn", "--out", str(tmp_path / "cli")]  # fmt: skip
    assert main(args) == 0
    last = tmp_path / "cli" / (tmp_path / "cli" / "latest").read_text()
    assert json.loads((last / "trainer_state.json").read_text())["config"]["loss_weighting"] == "turn"


def test_video_cache_decodes_each_clip_once_across_runs(small_checkpoint, tmp_path, monkeypatch):
    """--video-cache DIR: the first run decodes the clips and keeps them in DIR; a second run on the same files
    reads them back and decodes nothing."""
    import qwen2vl.processing.video as video_mod
    from recipes.synth.data import VIDEO_MIN_PIXELS, ball_frame
    from recipes.synth.data import write_mp4 as _write_mp4

    d = tmp_path / "clips"
    d.mkdir()
    records = []
    for i, colour in enumerate(("red", "blue")):
        _write_mp4(d / f"{colour}.mp4", [ball_frame(colour, 10, 20 + 10 * k, 56) for k in range(4)])
        records.append({"messages": [
            {"role": "user", "content": [{"type": "video", "video": f"{colour}.mp4", "min_pixels": VIDEO_MIN_PIXELS},
                                         {"type": "text", "text": "What colour is the ball?"}]},
            {"role": "assistant", "content": colour}]})  # fmt: skip
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cache = tmp_path / "cache"
    args = ["train", "--stage", "2", "--model", str(small_checkpoint), "--data", str(d / "train.jsonl"),
            "--max-steps", "1", "--batch-tokens", "512", "--no-progress", "--video-cache", str(cache)]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "first")]) == 0
    assert len(list(cache.rglob("*.clip"))) == 2
    last = tmp_path / "first" / (tmp_path / "first" / "latest").read_text()
    assert json.loads((last / "trainer_state.json").read_text())["config"]["video_cache"] == str(cache)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded a cached clip")

    monkeypatch.setattr(video_mod, "_load_file", no_decoding)
    assert main([*args, "--out", str(tmp_path / "second")]) == 0
    first, second = (json.loads((tmp_path / n / "metrics.jsonl").read_text().splitlines()[0])
                     for n in ("first", "second"))  # fmt: skip
    assert first["loss"] == second["loss"]  # the same clips, so the same step
