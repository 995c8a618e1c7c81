"""The scorers of the paper's benchmarks, each ``score(prediction, reference) -> float`` in [0, 1].

- ``exact``: exact match after normalisation (case, surrounding spaces and punctuation, articles).
- ``vqa``: VQAv2 accuracy with ten human answers: min(#humans who gave the answer / 3, 1), averaged over the
  ten leave-one-out subsets of the references, as the official evaluation does.
- ``anls``: DocVQA's average normalised Levenshtein similarity: 1 - distance/max(len) when that distance is
  below 0.5, else 0; the best over the references.
- ``relaxed``: ChartQA's relaxed accuracy: a number within 5% of the reference number, else exact match.
- ``box``: RefCOCO's Acc@0.5: the first box of the answer (Qwen2-VL's grounding format, 0-1000 coordinates),
  IoU with the reference box >= 0.5.
- ``choice``: multiple choice: the option letter found in the answer equals the reference letter.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence

from ..processing.grounding import Box, parse_boxes

ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> str:
    text = PUNCT.sub(" ", text.lower())
    return " ".join(ARTICLES.sub(" ", text).split())


def _references(reference: str | Sequence[str]) -> list[str]:
    return [reference] if isinstance(reference, str) else list(reference)


def exact(prediction: str, reference: str | Sequence[str]) -> float:
    p = normalize(prediction)
    return float(any(p == normalize(r) for r in _references(reference)))


def vqa(prediction: str, reference: str | Sequence[str]) -> float:
    refs = [normalize(r) for r in _references(reference)]
    p = normalize(prediction)
    if len(refs) < 2:
        return float(bool(refs) and p == refs[0])
    scores = [min(1.0, sum(r == p for r in refs[:i] + refs[i + 1 :]) / 3) for i in range(len(refs))]
    return sum(scores) / len(scores)


def levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, reference: str | Sequence[str], threshold: float = 0.5) -> float:
    p = " ".join(prediction.lower().split())
    best = 0.0
    for r in _references(reference):
        r = " ".join(r.lower().split())
        if not p and not r:
            return 1.0
        distance = levenshtein(p, r) / max(len(p), len(r))
        best = max(best, 1 - distance if distance < threshold else 0.0)
    return best


NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?%?")


def _number(text: str) -> float | None:
    if not (found := NUMBER.findall(text)):
        return None
    value = found[-1].replace(",", "")
    return float(value[:-1]) / 100 if value.endswith("%") else float(value)


def relaxed(prediction: str, reference: str | Sequence[str], tolerance: float = 0.05) -> float:
    guess = _number(prediction)
    for r in _references(reference):
        target = _number(r)
        if target is not None and guess is not None and NUMBER.fullmatch(r.strip()):
            if guess == target or target != 0 and abs(guess - target) / abs(target) <= tolerance:
                return 1.0
        elif normalize(prediction) == normalize(r):
            return 1.0
    return 0.0


def box(prediction: str, reference: str | Sequence[str] | Sequence[float], threshold: float = 0.5) -> float:
    """Reference: a box in the grounding text format or [x1, y1, x2, y2] (0-1000 coordinates)."""
    return float(box_iou(prediction, reference) >= threshold)


def box_iou(prediction: str, reference: str | Sequence[str] | Sequence[float]) -> float:
    """The IoU of the prediction's first box with the best-matching reference box (0 when either has none): what
    Acc@0.5 thresholds, kept for the report's mean IoU, which shows progress long before boxes pass 0.5."""
    if isinstance(reference, str) or reference and isinstance(reference[0], str):
        targets = [b for r in _references(reference) for b in parse_boxes(r)]
    else:
        targets = [Box(*map(float, reference))]
    guesses = parse_boxes(prediction)
    if not guesses or not targets:
        return 0.0
    return max(guesses[0].iou(t) for t in targets)


CHOICE = [
    re.compile(r"^\s*\(?([A-J])(?:\)|[.:]|\s*$)"),  # "B", "(B) cat", "B. cat", "B: cat" (not "I think")
    re.compile(r"(?:answer|option)\s*(?:is|:)?\s*\(?([A-J])\)?\b", re.I),  # "the answer is B"
    re.compile(r"\(([A-J])\)"),  # "... (C) ..."
    re.compile(r"\b([A-J])\b"),  # a lone capital letter anywhere
]


def choice_letter(prediction: str) -> str | None:
    for pattern in CHOICE:
        if m := pattern.search(prediction):
            return m.group(1).upper()
    return None


def choice(prediction: str, reference: str | Sequence[str]) -> float:
    letter = choice_letter(prediction)
    letters = {r.strip().strip("()").upper()[:1] for r in _references(reference)}
    return float(letter is not None and letter in letters)


SCORERS: dict[str, Callable[..., float]] = {
    "exact": exact, "vqa": vqa, "anls": anls, "relaxed": relaxed, "box": box, "choice": choice,
}  # fmt: skip
