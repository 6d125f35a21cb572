"""Exact match, token F1 and ROUGE-L against hand-computed values."""

from __future__ import annotations

import pytest

from ctloop.evaluation.textmetrics import exact_match, normalise, rouge_l, token_f1


def test_normalise_drops_case_punctuation_and_articles():
    assert normalise("The  Real-time Strategy game!") == "realtime strategy game"


@pytest.mark.parametrize(
    ("prediction", "reference", "em", "f1", "rouge"),
    [
        ("A puzzle game", "puzzle game", 1.0, 1.0, 1.0),
        ("puzzle game for kids", "puzzle game", 0.0, 2 * (2 / 4) * 1 / (2 / 4 + 1), 2 * (2 / 4) * 1 / (2 / 4 + 1)),
        ("game puzzle", "puzzle game", 0.0, 1.0, 0.5),
        ("sound editor", "puzzle game", 0.0, 0.0, 0.0),
        ("", "", 1.0, 1.0, 1.0),
    ],
    ids=["articles-ignored", "extra-words", "order-matters-for-rouge", "disjoint", "both-empty"],
)
def test_metrics(prediction, reference, em, f1, rouge):
    assert exact_match(prediction, reference) == em
    assert token_f1(prediction, reference) == pytest.approx(f1)
    assert rouge_l(prediction, reference) == pytest.approx(rouge)


def test_custom_metrics_load_by_name_and_bad_names_fail_clearly():
    from ctloop.errors import ConfigError
    from ctloop.evaluation.textmetrics import load_metrics, score

    metrics = load_metrics({"verbatim": "operator:eq"})
    assert score("a b", "a b", metrics)["verbatim"] == 1.0
    with pytest.raises(ConfigError, match="eval.custom_metrics.mine: cannot load 'nowhere:f'"):
        load_metrics({"mine": "nowhere:f"})
