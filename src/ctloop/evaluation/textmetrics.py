"""Reference-based metrics for generated answers: exact match, token F1, ROUGE-L (per example).

Text is normalised the usual way (lower case, punctuation and articles removed, whitespace
collapsed) before comparing, so "The Game." and "game" match.
"""

from __future__ import annotations

import re
import string
from collections import Counter

ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalise(text: str) -> str:
    return " ".join(ARTICLES.sub(" ", text.lower().translate(PUNCTUATION)).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalise(prediction) == normalise(reference))


def token_f1(prediction: str, reference: str) -> float:
    predicted, expected = normalise(prediction).split(), normalise(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    """F-measure of the longest common subsequence of tokens."""
    predicted, expected = normalise(prediction).split(), normalise(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    previous = [0] * (len(expected) + 1)
    for word in predicted:
        current = [0]
        for j, other in enumerate(expected, start=1):
            current.append(previous[j - 1] + 1 if word == other else max(previous[j], current[j - 1]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(predicted), lcs / len(expected)
    return 2 * precision * recall / (precision + recall)


METRICS = {"exact_match": exact_match, "token_f1": token_f1, "rouge_l": rouge_l}


def load_metrics(custom: dict[str, str]) -> dict:
    """The built-in metrics plus custom ones named 'module:function' in the config."""
    from ctloop.plugins import import_callable

    return {
        **METRICS,
        **{name: import_callable(target, f"eval.custom_metrics.{name}") for name, target in custom.items()},
    }


def score(prediction: str, reference: str, metrics: dict | None = None) -> dict[str, float]:
    return {name: float(metric(prediction, reference)) for name, metric in (metrics or METRICS).items()}
