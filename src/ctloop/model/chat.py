"""Chat records and chat requests rendered the way the base model was trained to read them.

An instruct base model (Llama 3, Qwen, Mistral, Gemma) was trained on its own chat template, and
vLLM and SGLang apply that template on /v1/chat/completions. So when the tokenizer has a template,
ctloop renders chat with `tokenizer.apply_chat_template` everywhere: the training and evaluation
records made from `messages`, and the in-process server's /v1/chat/completions. What is trained,
gated and served is then the same text. Only a tokenizer without a template falls back to the
hand-made "role: content" format (`ctloop.data.records.chat_prompt`).

The format is recorded with each cycle (`describe()`), and the template's hash is part of the
cycle id: a changed template is a changed cycle.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from ctloop.data.records import BadRow, chat_prompt


@dataclass(frozen=True)
class ChatFormat:
    kind: str  # "template" (the tokenizer's own) or "plain" (ctloop's fallback)
    template_hash: str = ""  # sha256 of the template text, first 16 hex digits; "" for plain
    tokenizer: Any = field(default=None, compare=False, repr=False)

    def prompt(self, messages: list[dict[str, Any]]) -> str:
        """The text the model reads before its next answer."""
        if self.kind == "plain":
            return chat_prompt(messages)
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def split(self, messages: list[dict[str, Any]]) -> tuple[str, str]:
        """A chat record as (prompt, completion): the turns before the last assistant message, and
        that message as the template writes it (its end-of-turn marker included, so the model learns
        to end its turn). BadRow when the template does not render the conversation as the prompt
        followed by the answer (the loss could not be put on the answer alone)."""
        prompt = self.prompt(messages[:-1])
        if self.kind == "plain":
            return prompt, " " + messages[-1]["content"]
        whole = self.tokenizer.apply_chat_template(messages, tokenize=False)
        if not whole.startswith(prompt):
            raise BadRow(
                "chat_template",
                "the tokenizer's chat template does not render this conversation as its prompt followed by the "
                "answer; check the template, or give the row as prompt + completion",
            )
        return prompt, whole[len(prompt) :].rstrip()

    def split_all(self, messages: list[dict[str, Any]]) -> tuple[str, str, dict[str, Any]]:
        """`split`, and the assistant turns before the last as character spans of the prompt
        (metadata `prompt_loss_spans`), as the template writes each turn (its end-of-turn marker
        included): the loss of `train.chat_loss: all_assistant`. BadRow when the template does not
        render the conversation turn after turn (some drop earlier turns' reasoning, for example)."""
        prompt, completion = self.split(messages)
        spans = []
        for index, message in enumerate(messages[:-1]):
            if message["role"] != "assistant":
                continue
            before, through = self.prompt(messages[:index]), self._through(messages[: index + 1])
            if not (through.startswith(before) and prompt.startswith(through)):
                raise BadRow(
                    "chat_template",
                    "the tokenizer's chat template does not render this conversation turn after turn, so its "
                    "earlier assistant turns cannot be learned in place; use train.chat_loss: last",
                )
            spans.append([len(before), len(through)])
        return prompt, completion, {"prompt_loss_spans": spans} if spans else {}

    def _through(self, messages: list[dict[str, Any]]) -> str:
        """The conversation up to and including its last turn, as the prompt of a later turn shows it."""
        if self.kind == "plain":
            return "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

    def describe(self) -> dict[str, str]:
        return {"kind": self.kind, "template_hash": self.template_hash}


def chat_format(tokenizer: Any) -> ChatFormat:
    """The tokenizer's chat template when it has one, else the plain fallback."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return ChatFormat("plain")
    text = template if isinstance(template, str) else repr(sorted(template.items()))
    return ChatFormat("template", hashlib.sha256(text.encode()).hexdigest()[:16], tokenizer)
