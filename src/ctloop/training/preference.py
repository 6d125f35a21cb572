"""Preference objectives in ctloop's trainer: DPO on answer pairs, KTO on rated answers.

The reference policy is the champion (base + its adapter), or the bare base model in a first
cycle. With LoRA no second model copy is needed: the reference's log-probabilities of every
training sequence are computed once, before the trainable adapter exists, on the same base with
the reference adapter loaded (then unloaded). They are a pure function of the data and the
reference, so a resumed run computes the same ones.

Losses (log-probabilities are sums over the answer's tokens, the end-of-sequence token included):

- DPO (Rafailov et al., 2023): with h = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r)),
  sigmoid: -log s(beta h); robust (Chowdhury et al., 2024), unbiased when a share eps of the
  preferences is flipped: ((1 - eps)(-log s(beta h)) + eps log s(-beta h)) / (1 - 2 eps).
- KTO (Ethayarajh et al., 2024): z = max(0, mean over the batch of log pi(y'|x) - log ref(y'|x)) on
  mismatched pairs (each prompt with another example's answer, fixed once), without gradient;
  desirable answers lose w_d (1 - s(beta (r - z))), undesirable ones w_u (1 - s(beta (z - r))),
  r = log pi(y|x) - log ref(y|x); the batch's loss is the mean.

These match TRL's DPOTrainer (loss_type sigmoid / robust) and KTOTrainer on identical batches; the
tests check it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctloop.config import TrainConfig
from ctloop.console import progress_bar
from ctloop.data.preference import PreferenceSet
from ctloop.data.records import Record
from ctloop.model.batching import Example, collate, encode
from ctloop.model.losses import token_losses

if TYPE_CHECKING:
    import torch


# -- losses (pure functions of per-sequence log-probabilities) ------------------------------------


def dpo_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    *,
    beta: float,
    loss: str = "sigmoid",
    label_noise: float = 0.0,
) -> torch.Tensor:
    """Per-pair DPO losses."""
    import torch.nn.functional as F

    h = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    if loss == "sigmoid":
        return -F.logsigmoid(beta * h)
    if loss == "robust":
        return (-(1 - label_noise) * F.logsigmoid(beta * h) + label_noise * F.logsigmoid(-beta * h)) / (
            1 - 2 * label_noise
        )
    raise ValueError(f"train.dpo.loss={loss!r}: use sigmoid or robust")


def kto_loss(
    policy: torch.Tensor,
    reference: torch.Tensor,
    desirable: torch.Tensor,
    policy_mismatched: torch.Tensor,
    reference_mismatched: torch.Tensor,
    *,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> torch.Tensor:
    """The KTO loss of one batch (a scalar)."""
    import torch

    z = (policy_mismatched - reference_mismatched).mean().detach().clamp(min=0)
    ratio = policy - reference
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (ratio - z))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z - ratio))),
    )
    return losses.mean()


def kto_weights(answers: PreferenceSet, train: TrainConfig) -> tuple[float, float]:
    """(desirable, undesirable) weights: as configured, else the rarer kind weighs the class ratio and
    the other 1, so that both kinds weigh the same in the loss (the KTO paper asks for a ratio of
    weighted counts in [1, 4/3])."""
    up = answers.desirable
    down = len(answers.answers) - up
    configured = train.kto.desirable_weight, train.kto.undesirable_weight
    if configured[0] is not None and configured[1] is not None:
        return configured[0], configured[1]
    if not up or not down:
        default = (1.0, 1.0)
    else:
        default = (down / up, 1.0) if up < down else (1.0, up / down)
    return (configured[0] or default[0], configured[1] or default[1])


def sequence_logps(network: Any, examples: list[Example], pad_id: int) -> torch.Tensor:
    """Sum of the log-probabilities of each example's answer tokens, one value per example."""
    nll, mask = token_losses(network, collate_to(network, examples, pad_id))
    return -(nll * mask).sum(dim=1)


def collate_to(network: Any, examples: list[Example], pad_id: int) -> dict:
    device = next(network.parameters()).device
    return {k: v.to(device) for k, v in collate(examples, pad_id).items()}


# -- the term in the trainer ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Sequences:
    """The token sequences of a preference set, and which of them each step uses."""

    kind: str
    main: list[Example]  # dpo: chosen answers; kto: the rated answers
    other: list[Example]  # dpo: rejected answers; kto: each prompt with the previous example's answer
    desirable: list[bool]  # kto


class PreferenceTerm:
    """The preference part of each training step: its batches, reference log-probabilities, loss."""

    def __init__(self, data: PreferenceSet, train: TrainConfig, tokenizer: Any):
        self.kind = data.objective
        self.train = train
        self.pad_id = tokenizer.pad_token_id
        self.sequences = _encode(data, tokenizer, train.seed)
        self.weights = kto_weights(data, train) if self.kind == "kto" else (1.0, 1.0)
        self.schedule = _batches(len(self.sequences.main), train)
        self.reference: tuple[list[float], list[float]] = ([], [])

    def compute_reference(self, network: Any, autocast: Any) -> None:
        """The reference's log-probabilities of every sequence (`network` is the reference)."""
        import torch

        was_training = network.training
        network.eval()
        main, other = self.sequences.main, self.sequences.other
        rows = max(1, self.train.preference_batch_size)
        values: tuple[list[float], list[float]] = ([], [])
        total = 2 * ((len(main) + rows - 1) // rows)
        with torch.inference_mode(), progress_bar("reference log-probs", total, unit="batches") as advance:
            for column, examples in enumerate((main, other)):
                for start in range(0, len(examples), rows):
                    with autocast():
                        values[column].extend(
                            sequence_logps(network, examples[start : start + rows], self.pad_id).float().tolist()
                        )
                    advance()
        network.train(was_training)
        self.reference = values

    def tokens(self, index: int) -> int:
        rows = self.schedule[index]
        return sum(len(self.sequences.main[i].input_ids) + len(self.sequences.other[i].input_ids) for i in rows)

    def loss(self, network: Any, index: int) -> tuple[torch.Tensor, float]:
        """The preference loss of step `index` (0-based) of this process's schedule, and the batch's
        implicit-reward margin: chosen minus rejected (dpo), desirable minus undesirable (kto; NaN
        when the batch holds one kind only)."""
        import torch

        rows = self.schedule[index]
        main = [self.sequences.main[i] for i in rows]
        other = [self.sequences.other[i] for i in rows]
        ref_main = torch.tensor([self.reference[0][i] for i in rows])
        ref_other = torch.tensor([self.reference[1][i] for i in rows])
        if self.kind == "dpo":
            logps = sequence_logps(network, main + other, self.pad_id).float()
            chosen, rejected = logps[: len(rows)], logps[len(rows) :]
            ref_main, ref_other = ref_main.to(chosen.device), ref_other.to(chosen.device)
            dpo = self.train.dpo
            losses = dpo_losses(
                chosen, rejected, ref_main, ref_other, beta=dpo.beta, loss=dpo.loss, label_noise=dpo.label_noise
            )
            margin = float(((chosen - ref_main) - (rejected - ref_other)).mean().detach()) * dpo.beta
            return losses.mean(), margin
        policy = sequence_logps(network, main, self.pad_id).float()
        with torch.no_grad():
            mismatched = sequence_logps(network, other, self.pad_id).float()
        desirable = torch.tensor([self.sequences.desirable[i] for i in rows], device=policy.device)
        ref_main, ref_other = ref_main.to(policy.device), ref_other.to(policy.device)
        reward = (policy - ref_main).detach() * self.train.kto.beta
        both = bool(desirable.any() and (~desirable).any())
        margin = float(reward[desirable].mean() - reward[~desirable].mean()) if both else float("nan")
        loss = kto_loss(
            policy,
            ref_main,
            desirable,
            mismatched,
            ref_other,
            beta=self.train.kto.beta,
            desirable_weight=self.weights[0],
            undesirable_weight=self.weights[1],
        )
        return loss, margin

    def settings(self) -> dict:
        """What training.json and the manifest record about the objective."""
        out: dict = {"kind": self.kind, "examples": len(self.sequences.main), "steps": len(self.schedule)}
        if self.kind == "dpo":
            out |= self.train.dpo.model_dump()
        else:
            out |= {"beta": self.train.kto.beta, "desirable_weight": self.weights[0]}
            out |= {"undesirable_weight": self.weights[1], "desirable": sum(self.sequences.desirable)}
        return out


def reference_network(base: Any, reference_adapter: Path | None) -> Any:
    """The reference policy on `base`: the base with the reference adapter, or the bare base."""
    if reference_adapter is None:
        return base
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(reference_adapter), adapter_name="reference")


def release_reference(network: Any, base: Any) -> Any:
    """`base` again, with the reference adapter's layers removed."""
    return base if network is base else network.unload()


def _encode(data: PreferenceSet, tokenizer: Any, seed: int) -> _Sequences:
    if data.objective == "dpo":
        chosen = encode([Record(p.id, p.prompt, p.chosen) for p in data.pairs], tokenizer)
        rejected = encode([Record(p.id, p.prompt, p.rejected) for p in data.pairs], tokenizer)
        return _Sequences("dpo", chosen, rejected, [])
    answers = data.answers
    main = encode([Record(a.id, a.prompt, a.completion) for a in answers], tokenizer)
    # Each prompt with another example's answer, as TRL does (it shifts by one in dataset order), but
    # shifted in a seeded order: a correction's two sides sit next to each other, and a shift in
    # their order would pair a prompt with its own corrected answer.
    order = list(range(len(answers)))
    random.Random(seed).shuffle(order)
    partner = {order[j]: order[j - 1] for j in range(len(order))}
    other = encode([Record(a.id, a.prompt, answers[partner[i]].completion) for i, a in enumerate(answers)], tokenizer)
    return _Sequences("kto", main, other, [a.desirable for a in answers])


def _batches(n: int, train: TrainConfig) -> list[list[int]]:
    """`train.epochs` passes over the examples in a seeded order, `preference_batch_size` per step
    (a fractional last epoch takes its first batches)."""
    import math

    size = train.preference_batch_size
    schedule: list[list[int]] = []
    for epoch in range(math.ceil(train.epochs)):
        order = list(range(n))
        random.Random(train.seed + epoch).shuffle(order)
        batches = [order[i : i + size] for i in range(0, n, size)]
        if len(batches) > 1 and len(batches[-1]) == 1:  # KTO's mismatched pairs need two examples a batch
            batches[-2] += batches.pop()
        share = min(1.0, train.epochs - epoch)
        schedule.extend(batches[: max(1, round(share * len(batches)))])
    return schedule
