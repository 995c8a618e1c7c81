"""The JSON-object constraint of response_format json_object, against Python's json module: every prefix of a
valid object is allowed, and a whole text is accepted as complete exactly when json.loads reads an object."""

import json
import random

import pytest

from qwen2vl.generate.json_mode import JsonObject, step

START = ("", "start", None, 0)


def run(text):
    state = START
    for ch in text:
        state = step(state, ch)
        if state is None:
            return None
    return state


def random_value(rng, depth=0):
    kind = rng.choice(["obj", "arr", "str", "num", "lit"] if depth < 3 else ["str", "num", "lit"])
    if kind == "obj":
        keys = [rng.choice(["a", "b", "ké", 'q"', "\\"]) + str(i) for i in range(rng.randint(0, 3))]
        return {k: random_value(rng, depth + 1) for k in keys}
    if kind == "arr":
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if kind == "str":
        return "".join(rng.choice("ab \n\t\"\\/é😀\u0001") for _ in range(rng.randint(0, 5)))
    if kind == "num":
        return rng.choice([0, -0.5, 12, 3.25e-7, -120, 1e21])
    return rng.choice([True, False, None])


@pytest.mark.parametrize("seed", range(5))
def test_every_prefix_of_an_object_is_allowed_and_the_whole_is_complete(seed):
    rng = random.Random(seed)
    for _ in range(100):
        doc = {"k": random_value(rng)}
        for indent in (None, 2):
            text = json.dumps(doc, indent=indent, ensure_ascii=rng.random() < 0.5)
            for i in range(len(text)):
                assert run(text[:i]) is not None, text[:i]
                assert run(text[:i])[1] != "done"
            assert run(text)[1] == "done", text


def parses_to_object(text):
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def test_a_text_is_complete_exactly_when_json_reads_an_object():
    rng = random.Random(0)
    alphabet = '{}[]:,"\\ 0123-.eE+tfnrulsa\nx'
    seen = {True: 0, False: 0}
    for _ in range(20000):
        base = json.dumps({"a": random_value(rng)}) if rng.random() < 0.7 else ""
        chars = list(base)
        for _ in range(rng.randint(0, 3)):  # mutate: insert, delete or replace a character
            i = rng.randint(0, len(chars))
            op = rng.choice("idr")
            if op == "i" or not chars:
                chars.insert(i, rng.choice(alphabet))
            elif op == "d":
                del chars[min(i, len(chars) - 1)]
            else:
                chars[min(i, len(chars) - 1)] = rng.choice(alphabet)
        text = "".join(chars)
        state = run(text)
        expected = parses_to_object(text)
        assert (state is not None and state[1] == "done") == expected, text
        seen[expected] += 1
    assert min(seen.values()) > 1000  # both outcomes were really exercised


def test_tokens_eos_and_specials():
    vocab = {0: '{"', 1: 'a": ', 2: "1}", 3: "", 4: "}", 5: " x"}
    c = JsonObject(vocab.__getitem__, eos_ids={9})
    assert c.after(9) is None and c.after(3) is None and c.after(4) is None  # no eos or special before the end
    for t in (0, 1, 2):
        c.advance(t)
    assert c.done and c.after(9) is not None and c.after(5) is None
    with pytest.raises(ValueError, match="does not continue"):
        c.advance(5)
