"""Rows of the supported formats -> one normalized `Example`: a conversation, a prompt/completion, or text.

Formats: `messages` (role/content, and `reasoning_content` on assistant turns), ShareGPT (`conversations` of from/value), Alpaca (instruction, input,
output), `prompt`/`completion` and raw `text`. `columns` renames fields for other layouts. A row that does not
fit raises `BadRow` with what is wrong and how to fix it; the caller adds the file and row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
}
# Fields that identify a format, checked in this order by `format: auto`.
SIGNATURES = (
    ("messages", ("messages",)),
    ("sharegpt", ("conversations",)),
    ("alpaca", ("instruction", "output")),
    ("prompt_completion", ("prompt", "completion")),
    ("text", ("text",)),
)


class BadRow(Exception):
    """A row that cannot become a training sample; the message says why and what to do."""


class NothingTrained(BadRow):
    """A row that gives no trained token (a prompt cut by truncation, an empty answer): counted apart."""


@dataclass
class Example:
    messages: list[dict[str, str]] | None = None  # a conversation (chat template applies)
    prompt: str | None = None  # plain prompt -> completion (no chat template)
    completion: str | None = None
    text: str | None = None  # raw text, every token trained


class RowFormat:
    """Turns rows of one source into Examples; `columns` maps our field names to the data's."""

    def __init__(
        self, fmt: str, columns: dict[str, str], system_prompt: str | None, merge_system: bool = False
    ) -> None:
        self.format = fmt
        self.columns = columns
        self.system_prompt = system_prompt
        self.merge_system = merge_system  # data.system_role=merge: into the first user turn

    def field(self, name: str) -> str:
        return self.columns.get(name, name)

    def detect(self, row: dict[str, Any]) -> str:
        """The format of a source, from its first row (`format: auto`)."""
        for fmt, fields in SIGNATURES:
            if all(self.field(f) in row for f in fields):
                return fmt
        wanted = "; ".join(f"{fmt}: {', '.join(map(self.field, fields))}" for fmt, fields in SIGNATURES)
        raise BadRow(
            f"cannot tell the data format from the fields ({', '.join(row) or 'none'}); expected one of "
            f"[{wanted}]; set format: and columns: on this source"
        )

    def example(self, row: dict[str, Any]) -> Example:
        if self.format == "auto":
            self.format = self.detect(row)
        if self.format == "text":
            return Example(text=self._text(row, "text"))
        if self.format == "prompt_completion":
            prompt, completion = self._get(row, "prompt"), self._get(row, "completion")
            if isinstance(prompt, list) or isinstance(completion, list):  # conversational prompt/completion
                msgs = self._messages([*_as_list(prompt), *_as_list(completion)], "role", "content", ROLES)
                return Example(messages=self._with_system(row, msgs))
            return Example(
                prompt=self._text(row, "prompt", empty_ok=True), completion=self._text(row, "completion")
            )
        if self.format == "alpaca":
            instruction = self._text(row, "instruction")
            extra = row.get(self.field("input")) or ""
            if not isinstance(extra, str):
                raise BadRow(f"'{self.field('input')}' must be a string")
            user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
            msgs = [
                {"role": "user", "content": user},
                {"role": "assistant", "content": self._text(row, "output")},
            ]
            return Example(messages=self._with_system(row, msgs))
        if self.format == "sharegpt":
            turns = self._messages(self._get(row, "conversations"), "from", "value", SHAREGPT_ROLES)
            return Example(messages=self._with_system(row, turns))
        msgs = self._messages(self._get(row, "messages"), "role", "content", ROLES)
        return Example(messages=self._with_system(row, msgs))

    # ---- helpers

    def _get(self, row: dict[str, Any], name: str) -> Any:
        key = self.field(name)
        if key not in row:
            raise BadRow(f"no '{key}' field (found: {', '.join(row) or 'nothing'})")
        value = row[key]
        if (
            isinstance(value, str)
            and name in ("messages", "conversations")
            and value.lstrip().startswith("[")
        ):
            try:  # CSV cells hold conversations as JSON text
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise BadRow(f"'{key}' holds malformed JSON ({e.msg})") from None
        return value

    def _text(self, row: dict[str, Any], name: str, empty_ok: bool = False) -> str:
        value = self._get(row, name)
        if not isinstance(value, str):
            raise BadRow(f"'{self.field(name)}' must be a string, got {type(value).__name__}")
        if not empty_ok and not value.strip():
            raise BadRow(f"'{self.field(name)}' is empty")
        return value

    def _messages(self, turns: Any, role_key: str, content_key: str, roles: Any) -> list[dict[str, str]]:
        rk, ck, rc = self.field(role_key), self.field(content_key), self.field("reasoning_content")
        name = self.field("conversations" if role_key == "from" else "messages")
        if not isinstance(turns, list) or not turns:
            raise BadRow(f"'{name}' must be a non-empty list of {{{rk}, {ck}}} objects")
        out = []
        for i, m in enumerate(turns):
            if not isinstance(m, dict) or rk not in m or ck not in m:
                raise BadRow(f"{name}[{i}] needs '{rk}' and '{ck}'")
            if m[rk] not in roles:
                raise BadRow(f"{name}[{i}] has unknown role {m[rk]!r}; use one of {', '.join(roles)}")
            if not isinstance(m[ck], str):
                raise BadRow(f"{name}[{i}].{ck} must be a string")
            role = roles[m[rk]] if isinstance(roles, dict) else m[rk]
            if role == "assistant" and not m[ck].strip():
                raise BadRow(f"{name}[{i}] is an empty assistant turn")
            turn = {"role": role, "content": m[ck]}
            if role == "assistant" and m.get(rc) is not None:  # reasoning kept apart from the answer
                if not isinstance(m[rc], str):
                    raise BadRow(f"{name}[{i}].{rc} must be a string")
                turn["reasoning_content"] = m[rc]
            out.append(turn)
        if not any(m["role"] == "assistant" for m in out):
            raise BadRow("the conversation has no assistant turn, so nothing would be trained")
        if out[0]["role"] == "assistant":
            raise BadRow("the conversation starts with an assistant turn; add the user turn before it")
        if out[-1]["role"] != "assistant":  # a last turn nobody answers would be neither trained nor context
            raise BadRow(
                f"{name}[{len(out) - 1}] is a {out[-1]['role']} turn after the last assistant answer, so it is "
                "neither trained nor context for anything; end the conversation with an assistant turn"
            )
        return out

    def _with_system(self, row: dict[str, Any], msgs: list[dict[str, str]]) -> list[dict[str, str]]:
        if msgs[0]["role"] != "system":
            system = row.get(self.field("system")) if self.field("system") in row else self.system_prompt
            if isinstance(system, str) and system.strip():
                msgs = [{"role": "system", "content": system}, *msgs]
        return _merge_system(msgs) if self.merge_system else msgs


def _merge_system(msgs: list[dict[str, str]]) -> list[dict[str, str]]:
    """System turns folded into the first user turn after them (for templates without a system role)."""
    out: list[dict[str, str]] = []
    pending: list[str] = []
    for m in msgs:
        if m["role"] == "system":
            pending.append(m["content"])
        elif m["role"] == "user" and pending:
            out.append({**m, "content": "\n\n".join([*pending, m["content"]])})
            pending = []
        else:
            out.append(m)
    if pending:
        raise BadRow("a system turn with no user turn after it cannot be merged (data.system_role=merge)")
    return out


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, list):
        return value
    raise BadRow("a conversational prompt/completion needs both as lists of {role, content} turns")
