"""Conversations -> token ids and a loss mask, using the tokenizer's own chat template.

The assistant spans are found by rendering prefixes of the conversation: the text before turn i (with the
generation prompt) and the text through turn i. That works for any template, with or without generation
markers. The text is tokenized once, and tokens overlapping a trained span are trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sft.data.formats import BadRow
from sft.errors import SftError

IGNORE_INDEX = -100


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]  # same length; IGNORE_INDEX where no loss is taken (always at position 0)


def assistant_char_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Render the conversation and return (text, [(start, end) of each assistant answer + end-of-turn])."""

    def render(msgs: list[dict[str, str]], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    if not getattr(tokenizer, "chat_template", None):
        raise SftError(
            "the model's tokenizer has no chat template, so chat rows cannot be rendered; "
            "use an instruct model's tokenizer, or train raw text with format: text"
        )
    text = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], True)
        through = text if i == len(messages) - 1 else render(messages[: i + 1], False)
        if not (through.startswith(before) and text.startswith(through)):
            raise BadRow(
                "the chat template does not render conversation prefixes consistently (it rewrites earlier "
                "turns), so assistant turns cannot be located; use a template without history rewriting"
            )
        # Whitespace the template puts after the end-of-turn marker is layout, not part of the answer.
        spans.append((len(before), len(through.rstrip())))
    return text, spans


def tokenize_chat(tokenizer: Any, messages: list[dict[str, str]], train_on: str = "assistant") -> Sample:
    """Token ids of the rendered conversation; labels on the assistant turns (`train_on`), else IGNORE_INDEX."""
    text, spans = assistant_char_spans(tokenizer, messages)
    if train_on == "last_assistant":
        spans = spans[-1:]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    if train_on == "all":
        labels = list(ids)
    else:
        labels = [IGNORE_INDEX] * len(ids)
        for t, (start, end) in enumerate(enc["offset_mapping"]):
            if end > start and any(start < s_end and end > s_start for s_start, s_end in spans):
                labels[t] = ids[t]
    if labels:
        labels[0] = IGNORE_INDEX  # nothing precedes the first token, so nothing predicts it
    return Sample(ids, labels)


def tokenize_plain(
    tokenizer: Any, prompt: str, completion: str | None, train_on: str, add_eos: bool
) -> Sample:
    """Raw text (completion None: every token trained) or prompt + completion without a chat template."""
    first = tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else []
    rest = tokenizer(completion, add_special_tokens=False)["input_ids"] if completion is not None else []
    if add_eos and tokenizer.eos_token_id is not None:
        rest = [*rest, tokenizer.eos_token_id] if completion is not None else rest
        first = [*first, tokenizer.eos_token_id] if completion is None else first
    trained_prompt = completion is None or train_on == "all"
    labels = (list(first) if trained_prompt else [IGNORE_INDEX] * len(first)) + list(rest)
    ids = first + rest
    if labels:
        labels[0] = IGNORE_INDEX
    return Sample(ids, labels)
