"""The GPU paths, on a CUDA machine: numbers against transformers on the GPU (float32 and bfloat16), training on
the GPU (the same losses as on the CPU, bf16 autocast, a GPU checkpoint resumed on the CPU), and the shipped model
answering the same held-out questions on the GPU as on the CPU.

Not part of ``make test`` (the CI machines have no GPU): ``make test-cuda`` runs these, and fails rather than skips
where torch sees no GPU, so a green run always means the GPU paths ran."""

import copy

import pytest
import torch

import qwen2vl
from helpers import pixels, prompt, ref_logits
from test_parity import CASES, PATCH
from test_train import config, dataset  # noqa: F401  (a fixture)

pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda")


@pytest.fixture(scope="module", autouse=True)
def exact_float32():
    assert torch.cuda.is_available(), "make test-cuda needs a GPU that torch can see"
    # float32 means float32: no TF32 in cuDNN's convolutions (transformers' patch embedding is a Conv3d)
    # or in matrix products, else the comparison measures TF32's 10-bit mantissa, not our code
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def on(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def both(tiny_dir, tiny_ref, dtype):
    ours = qwen2vl.Qwen2VL.from_pretrained(tiny_dir[0], dtype=dtype, device=CUDA).eval()
    ref = copy.deepcopy(tiny_ref).to(CUDA, dtype)
    return ours, ref


def logits(ours, ref, case, dtype):
    ids, ig, vg = prompt(*CASES[case])
    ids = torch.tensor([ids])
    pv, pvv = pixels(ig, PATCH, 1), pixels(vg, PATCH, 2)
    ids_c, pv_c, pvv_c, ig_c, vg_c = on(CUDA, ids, pv, pvv, ig, vg)
    pv_c, pvv_c = on(dtype, pv_c, pvv_c)
    with torch.no_grad():
        o = ours(ids_c, None, pv_c, ig_c, pvv_c, vg_c)
    r = ref_logits(ref, ids_c, None, pv_c, ig_c, pvv_c, vg_c)
    return o.float().cpu(), r.float().cpu(), ref_logits(copy.deepcopy(ref).float().cpu(), ids, None, pv, ig, pvv, vg)


@pytest.mark.parametrize("case", CASES)
def test_float32_logits_match_transformers_on_the_gpu(tiny_dir, tiny_ref, case):
    ours, ref = both(tiny_dir, tiny_ref, torch.float32)
    o, r, _ = logits(ours, ref, case, torch.float32)
    assert (o - r).abs().max() < 1e-4


@pytest.mark.parametrize("case", ["images_of_different_sizes", "image_and_video", "multi_turn"])
def test_bfloat16_on_the_gpu_is_as_close_to_float32_as_transformers_bfloat16(tiny_dir, tiny_ref, case):
    ours, ref = both(tiny_dir, tiny_ref, torch.bfloat16)
    o, r, exact = logits(ours, ref, case, torch.bfloat16)
    ours_err, ref_err = (o - exact).abs().max(), (r - exact).abs().max()
    assert ours_err <= 1.5 * ref_err + 1e-3, (float(ours_err), float(ref_err))
    assert (o.argmax(-1) == exact.argmax(-1)).float().mean() > 0.9


def test_training_on_the_gpu_gives_the_cpu_losses(tiny_checkpoint, dataset, tmp_path):  # noqa: F811
    from qwen2vl.train.loop import train

    cpu = train(config(tiny_checkpoint, dataset, tmp_path / "cpu", max_steps=6, device="cpu"))
    gpu = train(config(tiny_checkpoint, dataset, tmp_path / "gpu", max_steps=6, device="cuda"))
    assert [m["loss"] for m in gpu] == pytest.approx([m["loss"] for m in cpu], rel=1e-3)
    assert gpu[-1]["loss"] < gpu[0]["loss"]


def test_bf16_autocast_on_the_gpu_and_a_gpu_checkpoint_resumed_on_the_cpu(
    tiny_checkpoint, dataset, tmp_path  # noqa: F811
):
    from qwen2vl.train.loop import train

    fp32 = train(config(tiny_checkpoint, dataset, tmp_path / "fp32", max_steps=4, device="cuda"))
    bf16 = train(config(tiny_checkpoint, dataset, tmp_path / "bf16", max_steps=4, device="cuda", dtype="bfloat16"))
    assert [m["loss"] for m in bf16] == pytest.approx([m["loss"] for m in fp32], rel=0.05)
    # the GPU run's checkpoint at step 2 (optimizer state on the GPU when saved) goes on on the CPU
    train(config(tiny_checkpoint, dataset, tmp_path / "moved", max_steps=2, device="cuda", save_every=2))
    rest = train(config(tiny_checkpoint, dataset, tmp_path / "moved", max_steps=4, device="cpu", save_every=2,
                        resume=True))  # fmt: skip
    assert [m["step"] for m in rest] == [3, 4]
    assert [m["loss"] for m in rest] == pytest.approx([m["loss"] for m in fp32[2:]], rel=1e-3)


def test_the_shipped_model_answers_the_same_on_the_gpu(tmp_path):
    from qwen2vl.cli import SHIPPED_MODEL
    from qwen2vl.eval.run import evaluate
    from recipes.synth.data import synthesize

    synthesize(tmp_path, seed=0, train=0, test=60)
    kw = dict(max_new_tokens=32, progress=False)
    cpu = evaluate(qwen2vl.load(SHIPPED_MODEL, dtype=torch.float32), tmp_path / "test.jsonl", **kw)
    gpu = evaluate(qwen2vl.load(SHIPPED_MODEL, dtype=torch.float32, device="cuda"), tmp_path / "test.jsonl", **kw)
    answers = lambda report: [r["prediction"] for r in report["records"]]  # noqa: E731
    same = sum(a == b for a, b in zip(answers(cpu), answers(gpu)))
    assert len(answers(gpu)) == 60 and same >= 58, (same, answers(cpu), answers(gpu))
