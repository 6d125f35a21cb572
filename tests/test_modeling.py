"""Token-budget batching, collation with loss masks, encoding, and per-token losses on a tiny Llama."""

from __future__ import annotations

import random

import pytest
import torch

from ctloop.data.records import Record
from ctloop.model.batching import IGNORE_INDEX, Example, collate, encode, token_budget_batches, token_counter
from ctloop.model.losses import token_losses

# -- token_budget_batches ------------------------------------------------------------------------

_rng = random.Random(1234)
VARIED = [_rng.randint(5, 60) for _ in range(300)]
WITH_LONG = [_rng.randint(5, 60) for _ in range(100)]
for _i in (3, 50, 99):
    WITH_LONG[_i] = 400  # longer than the whole budget

BATCH_CASES = [
    (VARIED, 256, 0),
    (VARIED, 256, 1),
    (VARIED, 256, None),
    (VARIED, 61, 7),
    (VARIED, 4096, 0),
    (WITH_LONG, 256, 0),
    (WITH_LONG, 256, None),
    ([10] * 50, 30, 3),
    ([1], 16, 0),
]
BATCH_IDS = [
    "varied-seed0",
    "varied-seed1",
    "varied-noseed",
    "tight-budget",
    "large-budget",
    "overlong-seed0",
    "overlong-noseed",
    "equal-lengths",
    "single",
]


@pytest.mark.parametrize(("lengths", "budget", "seed"), BATCH_CASES, ids=BATCH_IDS)
def test_batches_fit_the_budget(lengths, budget, seed):
    batches = token_budget_batches(lengths, budget, seed)
    for batch in batches:
        padded = len(batch) * max(lengths[i] for i in batch)
        assert padded <= budget or (len(batch) == 1 and lengths[batch[0]] > budget), (batch, padded)


@pytest.mark.parametrize(("lengths", "budget", "seed"), BATCH_CASES, ids=BATCH_IDS)
def test_batches_cover_every_index_once(lengths, budget, seed):
    batches = token_budget_batches(lengths, budget, seed)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(batch for batch in batches)


@pytest.mark.parametrize(("lengths", "budget", "seed"), BATCH_CASES, ids=BATCH_IDS)
def test_batches_are_deterministic(lengths, budget, seed):
    assert token_budget_batches(lengths, budget, seed) == token_budget_batches(list(lengths), budget, seed)


def test_overlong_examples_are_alone():
    batches = token_budget_batches(WITH_LONG, 256, seed=0)
    alone = sorted(b[0] for b in batches if len(b) == 1 and WITH_LONG[b[0]] > 256)
    assert alone == [3, 50, 99]


def test_different_seeds_give_different_batches():
    a, b = token_budget_batches(VARIED, 256, 0), token_budget_batches(VARIED, 256, 1)
    assert a != b
    assert sorted(map(sorted, a)) != sorted(map(sorted, b))  # different groupings, not just a different order


def test_batches_are_packed_greedily():
    # sorted by length: 1, 2 | 3, 4  (3 x 3 = 9 > 8 closes the first batch; 2 x 4 = 8 fits)
    assert token_budget_batches([3, 1, 2, 4], 8, seed=None) == [[1, 2], [0, 3]]
    assert token_budget_batches([5, 5, 100, 5], 20, seed=None) == [[0, 1, 3], [2]]
    assert token_budget_batches([10] * 6, 30, seed=None) == [[0, 1, 2], [3, 4, 5]]


def test_padding_stays_small_with_sorting_windows():
    batches = token_budget_batches(VARIED, 256, seed=0)
    padded = sum(len(b) * max(VARIED[i] for i in b) for b in batches)
    assert padded < 1.25 * sum(VARIED)


def test_no_examples_no_batches():
    assert token_budget_batches([], 256, seed=0) == []
    assert token_budget_batches([], 256, seed=None) == []


# -- collate -------------------------------------------------------------------------------------

EXAMPLES = [Example([1, 5, 6, 7, 2], 2), Example([1, 8, 2], 1), Example([1, 9, 9, 9, 9, 9, 2], 4)]


def test_collate_pads_and_masks():
    batch = collate(EXAMPLES, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 2, 0, 0], [1, 8, 2, 0, 0, 0, 0], [1, 9, 9, 9, 9, 9, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0], [1] * 7]
    x = IGNORE_INDEX
    assert batch["labels"].tolist() == [[x, x, 6, 7, 2, x, x], [x, 8, 2, x, x, x, x], [x, x, x, x, 9, 9, 2]]
    assert batch["attention_mask"].sum(dim=1).tolist() == [5, 3, 7]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_pad_id_only_in_padding():
    batch = collate(EXAMPLES, pad_id=63)
    assert (batch["input_ids"] == 63).sum().item() == 2 + 4
    assert ((batch["input_ids"] == 63) == (batch["attention_mask"] == 0)).all()


# -- encode --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from ctloop.training.tinymodel import _train_tokenizer

    texts = ["Describe the Debian package python3-jwt: Python 3 implementation of JSON Web Token"] * 5
    return _train_tokenizer(texts, vocab_size=300)


def test_encode_adds_bos_eos_and_prompt_len(tokenizer):
    records = [Record("a", "Describe the package:", " Python 3 token"), Record("b", "jwt", " JSON")]
    examples = encode(records, tokenizer)
    count = token_counter(tokenizer)
    prompt_lens = count([r.prompt for r in records])
    completion_lens = count([r.completion for r in records])
    for example, record, p, c in zip(examples, records, prompt_lens, completion_lens, strict=True):
        assert example.input_ids[0] == tokenizer.bos_token_id
        assert example.input_ids[-1] == tokenizer.eos_token_id
        assert example.prompt_len == 1 + p
        assert len(example.input_ids) == 1 + p + c + 1
        prompt_ids = tokenizer(record.prompt, add_special_tokens=False)["input_ids"]
        assert example.input_ids[1 : 1 + p] == prompt_ids
        assert tokenizer.decode(example.input_ids[example.prompt_len : -1]) == record.completion


# -- token_losses on a tiny random Llama ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def _examples(seed: int = 0) -> list[Example]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (5, 1), (1, 8), (6, 6)]  # (prompt tokens incl. <s>, completion tokens incl. </s>)
    return [Example(torch.randint(3, 64, (p + c,), generator=gen).tolist(), p) for p, c in shapes]


def test_loss_mask_counts_completion_tokens_only(tiny_llama):
    examples = _examples()
    with torch.no_grad():
        nll, mask = token_losses(tiny_llama, collate(examples, pad_id=0))
    width = max(len(e.input_ids) for e in examples)
    assert nll.shape == mask.shape == (4, width - 1)
    assert mask.sum(dim=1).tolist() == [4, 1, 8, 6]  # completion + </s> per row
    assert mask.sum(dim=1).tolist() == [len(e.input_ids) - e.prompt_len for e in examples]
    assert (nll[~mask] == 0).all()
    assert (nll[mask] > 0).all()
    for row, example in enumerate(examples):
        start = example.prompt_len - 1  # position t predicts token t + 1
        assert mask[row].nonzero().flatten().tolist() == list(range(start, len(example.input_ids) - 1))


def test_token_losses_match_manual_cross_entropy(tiny_llama):
    examples = _examples()
    with torch.no_grad():
        nll, mask = token_losses(tiny_llama, collate(examples, pad_id=0))
        for row, example in enumerate(examples):
            ids = torch.tensor([example.input_ids])
            logits = tiny_llama(input_ids=ids).logits[0, :-1]
            expected = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
            start = example.prompt_len - 1
            torch.testing.assert_close(
                nll[row, start : len(example.input_ids) - 1], expected[start:], atol=1e-5, rtol=1e-4
            )


def test_token_losses_ignore_padding(tiny_llama):
    examples = _examples()
    with torch.no_grad():
        nll_a, mask_a = token_losses(tiny_llama, collate(examples, pad_id=0))
        nll_b, mask_b = token_losses(tiny_llama, collate(examples, pad_id=63))
        alone, _ = token_losses(tiny_llama, collate(examples[1:2], pad_id=0))
    assert torch.equal(mask_a, mask_b)
    torch.testing.assert_close(nll_a, nll_b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(nll_a[1, : alone.shape[1]], alone[0], atol=1e-5, rtol=1e-4)


def test_prompt_changes_completion_loss_but_is_not_scored(tiny_llama):
    examples = _examples()
    changed = [
        Example(
            [e.input_ids[0], *[(t % 60) + 3 for t in e.input_ids[1 : e.prompt_len]], *e.input_ids[e.prompt_len :]],
            e.prompt_len,
        )
        for e in examples
    ]
    with torch.no_grad():
        nll, mask = token_losses(tiny_llama, collate(examples, pad_id=0))
        nll_changed, mask_changed = token_losses(tiny_llama, collate(changed, pad_id=0))
    assert torch.equal(mask, mask_changed)
    assert not torch.allclose(nll[0], nll_changed[0])  # the model conditions on the prompt ...
    assert mask.sum().item() == 19  # ... but only the 4 + 1 + 8 + 6 completion tokens carry loss


def test_token_losses_keep_the_models_own_head_soft_capping():
    """Gemma 2 soft-caps its logits: the output projection alone would give other losses."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(
        Gemma2Config(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=8,
            final_logit_softcapping=2.0,
            pad_token_id=0,
        )
    ).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(200)  # logits around 10: far beyond the cap
    examples = _examples()
    with torch.no_grad():
        nll, mask = token_losses(model, collate(examples, pad_id=0))
        for row, example in enumerate(examples):
            ids = torch.tensor([example.input_ids])
            output = model(input_ids=ids, output_hidden_states=True)
            expected = torch.nn.functional.cross_entropy(output.logits[0, :-1], ids[0, 1:], reduction="none")
            uncapped = torch.nn.functional.cross_entropy(
                model.lm_head(output.hidden_states[-1])[0, :-1], ids[0, 1:], reduction="none"
            )
            start = example.prompt_len - 1
            torch.testing.assert_close(
                nll[row, start : len(example.input_ids) - 1], expected[start:], atol=1e-5, rtol=1e-4
            )
            assert (uncapped[start:] - expected[start:]).abs().max() > 1.0  # the cap matters here


def test_token_losses_give_the_gradients_of_full_logits(tiny_llama):
    batch = collate(_examples(), pad_id=0)
    nll, mask = token_losses(tiny_llama, batch)
    nll.sum().backward()
    fast = {name: p.grad.clone() for name, p in tiny_llama.named_parameters()}
    tiny_llama.zero_grad()
    logits = tiny_llama(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="sum"
    ).backward()
    for name, p in tiny_llama.named_parameters():
        torch.testing.assert_close(fast[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
    tiny_llama.zero_grad()
