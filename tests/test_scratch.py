"""From nothing: a small tokenizer with the Qwen2-VL special tokens, and a random model directory around it that
our loader, the processor, chat and transformers all accept."""

import torch

import qwen2vl
from qwen2vl.train.scratch import init_model_dir, train_tokenizer

TEXTS = ["A red circle and two blue squares.", "What colour is the shape?", "red", "The text says KQ7.",
         "A green ball moves to the left.", "How many shapes are there?", "3"] * 20  # fmt: skip


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

    answer = assistant.chat([{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (60, 60))},
                                                          {"type": "text", "text": "What colour?"}]}], max_new_tokens=3)  # fmt: skip
    assert isinstance(answer, str)
    import transformers

    ref = transformers.Qwen2VLForConditionalGeneration.from_pretrained(path).eval()
    ours = qwen2vl.Qwen2VL.from_pretrained(path)
    ids = torch.tensor([[5, 7, 9, 11]])
    with torch.no_grad():
        assert (ours(ids) - ref(input_ids=ids).logits).abs().max() < 1e-4
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size < 40 * 2**20
