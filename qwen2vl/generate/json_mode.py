"""``response_format: {"type": "json_object"}``: the answer is kept a prefix of one JSON object, token by token,
and ends where the object closes, so it always parses (unless it runs out of tokens first: finish "length").
A candidate token is allowed when its text keeps the answer a valid prefix, by a small pushdown automaton over
characters (RFC 8259, an object at the top).
"""

from __future__ import annotations

from collections.abc import Callable
from string import hexdigits

WHITESPACE = " \t\n\r"
MAX_WHITESPACE = 32  # a run longer than indentation needs is a model looping on blanks: refused
NUMBER_END = {"zero", "int", "frac", "exp"}  # number states where the number may end
# (state, character class) -> next state, for numbers: "-" "0" "1-9" "." "e/E" "+/-"
NUMBER = {
    ("minus", "0"): "zero", ("minus", "d"): "int", ("int", "0"): "int", ("int", "d"): "int",
    ("zero", "."): "dot", ("int", "."): "dot", ("dot", "0"): "frac", ("dot", "d"): "frac",
    ("frac", "0"): "frac", ("frac", "d"): "frac", ("zero", "e"): "e", ("int", "e"): "e", ("frac", "e"): "e",
    ("e", "s"): "esign", ("e", "0"): "exp", ("e", "d"): "exp", ("esign", "0"): "exp", ("esign", "d"): "exp",
    ("exp", "0"): "exp", ("exp", "d"): "exp",
}  # fmt: skip
NUMBER_CLASS = {"0": "0", **dict.fromkeys("123456789", "d"), ".": ".", "e": "e", "E": "e", "+": "s", "-": "s"}
LITERALS = {"t": "rue", "f": "alse", "n": "ull"}
CLOSERS = {"{": "}", "[": "]"}

State = tuple[str, str, object, int]  # (open brackets, mode, detail of the mode, whitespace run)


def _after_value(stack: str) -> State:
    return (stack, "after", None, 0) if stack else ("", "done", None, 0)


def step(state: State, ch: str) -> State | None:
    """The state after one more character, or None when the text would no longer begin a JSON object."""
    stack, mode, detail, ws = state
    if mode == "string":
        is_key, escape = detail
        if escape == 1:
            if ch == "u":
                return stack, mode, (is_key, 5), 0
            return (stack, mode, (is_key, 0), 0) if ch in '"\\/bfnrt' else None
        if escape > 1:  # the four hex digits of \uXXXX
            return (stack, mode, (is_key, 0 if escape == 2 else escape - 1), 0) if ch in hexdigits else None
        if ch == '"':
            return (stack, "colon", None, 0) if is_key else _after_value(stack)
        if ch == "\\":
            return stack, mode, (is_key, 1), 0
        return None if ord(ch) < 0x20 else state
    if mode == "number":
        following = NUMBER.get((detail, NUMBER_CLASS.get(ch)))
        if following is not None:
            return stack, mode, following, 0
        return step(_after_value(stack), ch) if detail in NUMBER_END else None  # ended: ch belongs to what follows
    if mode == "literal":
        if ch != detail[0]:
            return None
        return (stack, mode, detail[1:], 0) if len(detail) > 1 else _after_value(stack)
    if ch in WHITESPACE:
        return (stack, mode, detail, ws + 1) if ws < MAX_WHITESPACE else None
    if mode == "start":
        return ("{", "key_or_end", None, 0) if ch == "{" else None
    if mode in ("key_or_end", "key"):
        if ch == '"':
            return stack, "string", (True, 0), 0
        return _after_value(stack[:-1]) if ch == "}" and mode == "key_or_end" else None
    if mode == "colon":
        return (stack, "value", None, 0) if ch == ":" else None
    if mode in ("value", "value_or_end"):
        if ch == "]" and mode == "value_or_end":
            return _after_value(stack[:-1])
        if ch in ("{", "["):
            return stack + ch, "key_or_end" if ch == "{" else "value_or_end", None, 0
        if ch == '"':
            return stack, "string", (False, 0), 0
        if ch in LITERALS:
            return stack, "literal", LITERALS[ch], 0
        number = "minus" if ch == "-" else NUMBER.get(("minus", NUMBER_CLASS.get(ch)))  # a digit: as after "-"
        return None if number is None else (stack, "number", number, 0)
    if mode == "after":
        if ch == ",":
            return stack, "key" if stack[-1] == "{" else "value", None, 0
        return _after_value(stack[:-1]) if ch == CLOSERS[stack[-1]] else None
    return None  # done: nothing may follow but whitespace


class JsonObject:
    """The constraint of one answer: which tokens may come next, given the text so far."""

    def __init__(self, token_text: Callable[[int], str], eos_ids: set[int] | frozenset[int]):
        self.token_text, self.eos_ids = token_text, eos_ids
        self.state: State = ("", "start", None, 0)

    @property
    def done(self) -> bool:
        return self.state[1] == "done"

    def after(self, token: int) -> State | None:
        """The state once ``token`` is appended, or None if it is not allowed."""
        if token in self.eos_ids:
            return self.state if self.done else None
        text = self.token_text(token)
        if not text:  # a special token, or bytes of a character still incomplete outside a string
            return None
        state = self.state
        for ch in text:
            state = step(state, ch)
            if state is None:
                return None
        return state

    def advance(self, token: int) -> None:
        state = self.after(token)
        if state is None:
            raise ValueError(f"token {token} does not continue the JSON answer")
        self.state = state
