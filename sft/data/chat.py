"""Chat rows -> token ids and a loss mask, using the tokenizer's own chat template.

The assistant spans are found by rendering prefixes of the conversation: the text before turn i (with the
generation prompt) and the text through turn i. That works for any template, with or without generation
markers. The text is tokenized once, and tokens overlapping an assistant span are trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sft.errors import SftError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]  # same length; IGNORE_INDEX where no loss is taken


def check_messages(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    """Validate a `messages` row; errors name the file:line and what to fix."""
    messages = row.get("messages")
    if messages is None:
        raise SftError(f"{where}: no 'messages' field (found: {', '.join(row) or 'nothing'})")
    if not isinstance(messages, list) or not messages:
        raise SftError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise SftError(f"{where}: messages[{i}] needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise SftError(
                f"{where}: messages[{i}] has unknown role {m['role']!r}; use one of {', '.join(ROLES)}"
            )
        if not isinstance(m["content"], str):
            raise SftError(f"{where}: messages[{i}].content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise SftError(f"{where}: the conversation has no assistant turn, so nothing would be trained")
    if out[0]["role"] == "assistant":
        raise SftError(
            f"{where}: the conversation starts with an assistant turn; add the user turn before it"
        )
    return out


def assistant_char_spans(
    tokenizer: Any, messages: list[dict[str, str]], where: str
) -> tuple[str, list[tuple[int, int]]]:
    """Render the conversation and return (text, [(start, end) of each assistant answer + end-of-turn])."""

    def render(msgs: list[dict[str, str]], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    text = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], True)
        through = render(messages[: i + 1], False)
        if not (through.startswith(before) and text.startswith(through)):
            raise SftError(
                f"{where}: the chat template does not render conversation prefixes consistently, "
                "so assistant turns cannot be located; use a template without history rewriting"
            )
        # Whitespace the template puts after the end-of-turn marker is layout, not part of the answer.
        spans.append((len(before), len(through.rstrip())))
    return text, spans


def tokenize_chat(tokenizer: Any, messages: list[dict[str, str]], where: str) -> Sample:
    text, spans = assistant_char_spans(tokenizer, messages, where)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    for t, (start, end) in enumerate(enc["offset_mapping"]):
        if end > start and any(start < s_end and end > s_start for s_start, s_end in spans):
            labels[t] = ids[t]
    return Sample(ids, labels)
