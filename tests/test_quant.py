"""int8 weight-only layers (qwen2vl.model.quant): the kernel computes with exactly the dequantised weight, each
weight is within half a step of its row, a quantised model stays close to the original (the shipped model's
greedy next tokens agree), and what is not implemented or not allowed is refused by name."""

from pathlib import Path

import pytest
import torch
from torch import nn

import qwen2vl
from qwen2vl.model.quant import Int8Linear

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "qwen2vl-synth"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_computes_with_the_dequantised_weight(dtype):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=True).to(dtype)
    q = Int8Linear(linear)
    w = linear.weight.float()
    assert ((q.dequantized() - w).abs() <= q.scale[:, None] / 2 + 1e-7).all()  # half a step of its row at most
    assert q.weight_int8.abs().amax(dim=1).eq(127).all()  # each row's largest weight is the full step
    x = torch.randn(3, 5, 96).to(dtype)
    expected = (x.float() @ q.dequantized().T + linear.bias.float()).to(dtype)
    # fp32 activations are computed in bf16 on the CPU (the kernel's fast path): bf16's rounding, no more
    torch.testing.assert_close(q(x), expected, rtol=2e-2, atol=2e-2)
    exact = (x.to(torch.bfloat16).float() @ q.dequantized().T + linear.bias.float()).to(dtype)
    torch.testing.assert_close(q(x), exact, rtol=1e-2, atol=1e-2)


def test_a_quantised_model_stays_close_and_cannot_be_saved(tiny_dir, tmp_path):
    model = qwen2vl.Qwen2VL.from_pretrained(tiny_dir[0]).eval()
    ids = torch.randint(0, model.config.text.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids)
        model.quantize("int8").pack_for_cpu()
        quantised = model(ids)
    layers = [m for m in model.model.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == 7 * model.config.text.num_hidden_layers and isinstance(model.lm_head, Int8Linear)
    assert not any(type(m) is nn.Linear for m in model.modules())  # the vision tower is packed instead
    error = (quantised - reference).abs().max() / reference.abs().max()
    assert 0 < error < 0.05
    with pytest.raises(ValueError, match="packed for CPU inference or quantized"):
        model.save_pretrained(tmp_path / "copy")


def test_the_shipped_models_greedy_tokens_agree_with_int8():
    """Teacher-forced over a real answer of the shipped model: its next-token choice at each position, fp32
    against int8 weights."""
    assistant = qwen2vl.load(SHIPPED, dtype="float32")
    messages = [{"role": "user", "content": [{"type": "image", "image": str(SHIPPED.parents[1] / "examples" /
                                                                           "shapes.png")},
                                             {"type": "text", "text": "How many shapes are there?"}]}]  # fmt: skip
    inputs = assistant.processor(messages)
    with torch.no_grad():
        new = assistant.model.generate(**inputs, max_new_tokens=24)
        full = torch.cat([inputs["input_ids"], new], dim=1)  # the prompt, then the fp32 model's answer
        fp32 = assistant.model(full, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
        int8 = qwen2vl.load(SHIPPED, dtype="float32", quantize="int8").model
        q = int8(full, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    agree = (fp32.argmax(-1) == q.argmax(-1)).float().mean()
    assert agree >= 0.95, float(agree)


def test_unimplemented_kinds_are_refused_by_name():
    with pytest.raises(ValueError, match=r"quantize='int4' is not implemented yet; implemented: int8"):
        qwen2vl.load(SHIPPED, quantize="int4")
