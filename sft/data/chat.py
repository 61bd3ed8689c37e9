"""Conversations -> token ids and a loss mask, from the tokenizer's own chat template (DESIGN invariant 12).

A conversation is rendered twice: for real, and with each message's content (and reasoning) replaced by a
unique stand-in word. The template text between the stand-ins, its scaffolding, must appear in the real render
in the same order; what lies between is each content as the template rendered it (trimmed, split at
`</think>`, moved: whatever it does). Nothing depends on a template rendering a prefix of a conversation the way
it renders the whole, which Qwen3, Phi-3, Mistral and DeepSeek templates do not.

Of each assistant turn the loss covers the answer as rendered and the end-of-turn marker after it
(sft/data/template.py decides which text that is), and the text the model itself writes between the
generation prompt and the answer: a reasoning block, gpt-oss's channel header, a leading space. Found by
comparing the turn with the template's own generation prompt for it. Not trained: the prompt, role headers, the
next turn's header, and an empty reasoning block a template inserts (Qwen3). The text is tokenized once; a token
overlapping a trained span is trained.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sft.data.formats import BadRow
from sft.data.template import STAND_IN, TemplateProfile, common_prefix, render, stand_in, template_profile
from sft.errors import SftError

IGNORE_INDEX = -100
THINK = re.compile(r"(\s*<think>\s*)(.*?)(\s*</think>\s*)(.*)", re.DOTALL)


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]  # same length; IGNORE_INDEX where no loss is taken (always at position 0)


def trained_tokens(labels: Any) -> int:
    """The one count of trained tokens (those that carry a loss), for one sample's labels (a list or an
    array) or a batch's (rows, width) label tensor. Position t is predicted from t-1, so a row's first
    label is never a target (it is IGNORE_INDEX anyway, as is every packed sample's first label)."""
    if isinstance(labels, list):
        return sum(t != IGNORE_INDEX for t in labels[1:])
    return int((labels[..., 1:] != IGNORE_INDEX).sum())  # numpy array or torch tensor


@dataclass
class ChatText:
    """A rendered conversation: its text, the trained character spans (one per assistant turn, in order)
    and what the template did that a reader of the mask should know (counted per source)."""

    text: str
    spans: list[tuple[int, int]]
    quirks: list[str] = field(default_factory=list)


@dataclass
class _Occurrence:
    name: str  # the stand-in
    start: int  # in the stand-in render
    end: int
    real: tuple[int, int] = (0, 0)  # where its content landed in the real render


@dataclass
class _Layout:
    """A stand-in render matched against the real render of the same messages."""

    stand: str
    real: str
    found: list[_Occurrence]

    def find(self, name: str) -> list[int]:
        return [k for k, o in enumerate(self.found) if o.name == name]


def render_chat(
    tokenizer: Any,
    messages: list[dict[str, str]],
    reasoning: str = "keep",
    profile: TemplateProfile | None = None,
) -> ChatText:
    """The conversation as the template renders it, with the span of each answer to train (see module doc)."""
    profile = profile or template_profile(tokenizer)
    if profile.refuses_system and any(m["role"] == "system" for m in messages):
        raise SftError(
            f"the chat template refuses a system turn ({profile.refuses_system}); set data.system_role=merge "
            "to fold system prompts into the first user turn, or leave system turns out of the data"
        )
    return _Renderer(tokenizer, messages, reasoning, profile).run()


def tokenize_chat(
    tokenizer: Any,
    messages: list[dict[str, str]],
    train_on: str = "assistant",
    reasoning: str = "keep",
    profile: TemplateProfile | None = None,
) -> Sample:
    """Token ids of the rendered conversation; labels on the assistant turns (`train_on`), else IGNORE_INDEX."""
    return tokenize_rendered(tokenizer, render_chat(tokenizer, messages, reasoning, profile), train_on)


def tokenize_rendered(tokenizer: Any, chat: ChatText, train_on: str = "assistant") -> Sample:
    spans = chat.spans[-1:] if train_on == "last_assistant" else chat.spans
    enc = tokenizer(chat.text, add_special_tokens=False, return_offsets_mapping=True)
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


class _Renderer:
    def __init__(
        self, tokenizer: Any, messages: list[dict[str, str]], reasoning: str, profile: TemplateProfile
    ):
        self.tok, self.messages, self.keep, self.profile = tokenizer, messages, reasoning == "keep", profile
        salt = ""
        while any(STAND_IN + salt in v for m in messages for v in m.values()):
            salt += "X"
        self.pattern = re.compile(re.escape(STAND_IN + salt) + r"\d+Q")
        self.content = [stand_in(2 * i, salt) for i in range(len(messages))]
        self.thought = [stand_in(2 * i + 1, salt) for i in range(len(messages))]
        self.stand: list[dict[str, str]] = []
        self.real: list[dict[str, str]] = []
        self.answer: list[str] = []  # what the template should show of each content (its answer part)
        self.reasoning: list[str | None] = []
        for i, m in enumerate(messages):
            self._add(i, m)
        self.quirks: list[str] = []
        self.renders: dict[tuple[int, bool], str] = {}  # stand-in renders of message prefixes
        self.moved = False  # the last answer is trained after the prompt render (_with_prompt_context)

    def _add(self, i: int, m: dict[str, str]) -> None:
        content, given = m["content"], m.get("reasoning_content")
        stand = {"role": m["role"], "content": self.content[i]}
        real = {"role": m["role"], "content": content}
        answer, thought = content, None
        if m["role"] == "assistant":
            split = THINK.fullmatch(content)
            if given is not None and given.strip():
                thought = given
                stand |= {"reasoning_content": self.thought[i], "thinking": self.thought[i]}
                real |= {"reasoning_content": given, "thinking": given}
            elif split:  # reasoning inside the content: the stand-in keeps the tags the template may parse
                opener, inner, closer, answer = split.groups()
                thought = inner if inner.strip() else None
                stand["content"] = opener + (self.thought[i] if thought else "") + closer + self.content[i]
        self.stand.append(stand)
        self.real.append(real)
        self.answer.append(answer)
        self.reasoning.append(thought)

    # ---- rendering and matching

    def _layout(self, n: int, generation_prompt: bool) -> _Layout:
        """Render messages[:n] both ways and locate every stand-in's content in the real render."""
        stand = self._stand_render(n, generation_prompt)
        real = render(self.tok, self.real[:n], generation_prompt)
        found = [_Occurrence(m.group(), m.start(), m.end()) for m in self.pattern.finditer(stand)]
        pieces = [stand[: found[0].start] if found else stand]
        pieces += [stand[a.end : b.start] for a, b in zip(found, found[1:], strict=False)]
        if found:
            pieces.append(stand[found[-1].end :])
        spans = _locate(pieces, [self._renderings(o.name) for o in found], real)
        if spans is None:
            raise BadRow(_mismatch(pieces, real))
        for o, span in zip(found, spans, strict=True):
            o.real = span
        return _Layout(stand, real, found)

    def _renderings(self, name: str) -> list[str]:
        """Likely renderings of a stand-in's real text, tried before any other split (most templates show
        content as is, trimmed, or after `</think>`)."""
        if name in self.thought:
            texts = [self.reasoning[self.thought.index(name)] or ""]
        else:
            i = self.content.index(name)
            texts = [self.answer[i], self.messages[i]["content"].split("</think>")[-1]]
        out: list[str] = []
        for t in texts:
            for v in (t, t.strip(), t.lstrip(), t.rstrip(), t.lstrip("\n")):
                if v not in out:
                    out.append(v)
        return out

    def _stand_render(self, n: int, generation_prompt: bool) -> str:
        key = (n, generation_prompt)
        if key not in self.renders:
            self.renders[key] = render(self.tok, self.stand[:n], generation_prompt)
        return self.renders[key]

    def _prompt_tail(self, i: int) -> tuple[str, str | None]:
        """The template's generation prompt for turn i: its text after the last stand-in, and that stand-in."""
        text = self._stand_render(i, True)
        found = list(self.pattern.finditer(text))
        return (text[found[-1].end() :], found[-1].group()) if found else (text, None)

    # ---- the algorithm

    def run(self) -> ChatText:
        layout = self._with_prompt_context(self._layout(len(self.messages), False))
        self._note_system(layout)
        parts: list[str] = []
        spans: list[tuple[int, int]] = []
        cursor = length = 0  # how far the real render is written out; the length of the text so far
        for i, m in enumerate(self.messages):
            if m["role"] != "assistant":
                continue
            start, prompt, trained, end = self._turn(layout, i)
            skip = max(cursor - start, 0)  # text the turn before already wrote (its end-of-turn marker)
            for piece, train in ((layout.real[cursor:start], False), (prompt, False), (trained, True)):
                piece, skip = piece[skip:], max(skip - len(piece), 0)
                if train:
                    spans.append((length, length + len(piece)))
                parts.append(piece)
                length += len(piece)
            cursor = end
        parts.append(layout.real[cursor:])
        return ChatText("".join(parts), spans, sorted(set(self.quirks)))

    def _turn(self, layout: _Layout, i: int) -> tuple[int, str, str, int]:
        """Assistant turn i as (start in the real render, untrained text, trained text, end in the real render):
        the real render's text from `start` to `end` is replaced by the two."""
        answers, thoughts = layout.find(self.content[i]), layout.find(self.thought[i])
        if len(answers) != 1 or len(thoughts) > 1:
            how = "does not render" if not answers else "renders twice"
            raise BadRow(f"the chat template {how} the assistant turn messages[{i}], so it cannot be trained")
        found, k = layout.found, answers[0]
        first = min([k, *thoughts])
        start = found[first - 1].real[1] if first else 0
        header = layout.stand[found[first - 1].end if first else 0 : found[first].start]
        tail, after = self._prompt_tail(i)
        if first and after != found[first - 1].name:
            tail = header  # the prompt ends somewhere else: the whole header counts as prompt
        answer = layout.real[found[k].real[0] : found[k].real[1]]
        middle = layout.real[found[first].real[0] : found[k].real[0]]  # rendered reasoning, if any
        thought, reasoned = self.reasoning[i], bool(thoughts)
        if thought and not thoughts:
            if self.keep:  # the template dropped it: put it back the way the template writes reasoning
                cut = len(header) - common_prefix(tail, header)  # its text between prompt and answer goes
                header, answer = header[: len(header) - cut], answer.lstrip()
                middle = self.profile.reasoning_open + thought.strip() + self.profile.reasoning_close
                reasoned = True
                self.quirks.append(
                    "reasoning the template drops from a turn is put back (data.reasoning=keep)"
                )
            else:
                self.quirks.append(
                    "reasoning the template drops from a turn is not trained (data.reasoning=drop)"
                )
        turn = header + middle + answer
        gen = min(common_prefix(tail, turn), len(header) + len(middle))
        inserted = turn[gen : len(header) + len(middle)]
        if inserted and inserted == self.profile.empty_reasoning:
            gen = len(header) + len(middle)  # an empty reasoning block the template inserted: not the model's
            self.quirks.append(f"the template inserts an empty reasoning block {inserted!r} (not trained)")
        elif inserted and not reasoned:
            self.quirks.append(f"the model writes {inserted!r} before each answer (trained)")
        if answer != self.answer[i] and answer == self.answer[i].strip() and answer:
            self.quirks.append("the template trims whitespace at the edges of answers")
        marker = self._marker(layout, i, k)
        return start, turn[:gen], turn[gen:] + marker, found[k].real[1] + len(marker)

    def _marker(self, layout: _Layout, i: int, k: int) -> str:
        """The end-of-turn marker after answer k: it must start the template text that follows."""
        found = layout.found
        follows = layout.stand[found[k].end : found[k + 1].start if k + 1 < len(found) else len(layout.stand)]
        last = i == len(self.messages) - 1
        marker = self.profile.eot_last if last else self.profile.eot_mid
        if marker is None:
            return ""
        if not follows.startswith(marker):
            raise BadRow(
                f"the chat template ends the assistant turn messages[{i}] with {follows[:40]!r}, not with its "
                f"end-of-turn marker {marker!r}, so the turn's end cannot be located"
            )
        return marker

    # ---- what the template did (quirks)

    def _with_prompt_context(self, layout: _Layout) -> _Layout:
        """Templates that show the system prompt only when the conversation ends with a user turn (Mistral v3,
        Nemo: inside that turn) leave it out of a full render. The last answer is then trained after the prompt
        the template gives it at inference: that render, continued by the answer and its end."""
        n = len(self.messages) - 1
        if self.messages[n]["role"] != "assistant":
            return layout
        shown = {o.name for o in layout.found}
        if set(self.pattern.findall(self._stand_render(n, True))) <= shown:
            return layout
        prompt = self._layout(n, True)
        missing = [o for o in prompt.found if o.name not in shown]
        k = layout.find(self.content[n])
        thoughts = layout.find(self.thought[n])
        if len(k) != 1:
            return layout  # _turn says what is wrong
        first = min([*k, *thoughts])
        tail = prompt.stand[prompt.found[-1].end :] if prompt.found else prompt.stand
        at = layout.found[first - 1].end if first else 0
        at_real = layout.found[first - 1].real[1] if first else 0
        cut = common_prefix(tail, layout.stand[at : layout.found[first].start])
        shift_s, shift_r = len(prompt.stand) - (at + cut), len(prompt.real) - (at_real + cut)
        rest = [
            _Occurrence(
                o.name, o.start + shift_s, o.end + shift_s, (o.real[0] + shift_r, o.real[1] + shift_r)
            )
            for o in layout.found[first:]
        ]
        roles = {self.content[j]: self.messages[j]["role"] for j in range(len(self.messages))}
        what = " and ".join(sorted({roles.get(o.name, "reasoning") for o in missing}))
        self.quirks.append(
            f"the template shows the {what} prompt only when a conversation ends with a user turn (inside "
            "that turn); the last answer is trained after that prompt"
        )
        self.moved = True
        return _Layout(
            prompt.stand + layout.stand[at + cut :],
            prompt.real + layout.real[at_real + cut :],
            prompt.found + rest,
        )

    def _note_system(self, layout: _Layout) -> None:
        order = [o.name for o in layout.found]
        for i, m in enumerate(self.messages):
            if m["role"] != "system":
                continue
            if self.content[i] not in order:
                self.quirks.append("the template leaves the system prompt out (not in the training text)")
                continue
            users = [
                order.index(self.content[j])
                for j in range(i + 1, len(self.messages))
                if self.messages[j]["role"] == "user" and self.content[j] in order
            ]
            if users and order.index(self.content[i]) > min(users) and not self.moved:
                self.quirks.append("the template places the system prompt inside a later user turn")


def _locate(pieces: list[str], renderings: list[list[str]], real: str) -> list[tuple[int, int]] | None:
    """Split `real` as pieces[0] g0 pieces[1] g1 ... pieces[n]: the span of each g, or None.

    Each g first tries its likely renderings, then every place the next piece occurs; a depth-first search with
    the dead ends remembered, so a content that contains template text cannot derail it.
    """
    n = len(renderings)
    if not real.startswith(pieces[0]):
        return None
    if n == 0:
        return [] if real == pieces[0] else None

    def ends(k: int, pos: int) -> Iterator[int]:
        nxt = pieces[k + 1]
        if k == n - 1:
            if len(real) - len(nxt) >= pos and real.endswith(nxt):
                yield len(real) - len(nxt)
            return
        seen = set()
        for r in renderings[k]:
            if real.startswith(r, pos) and real.startswith(nxt, pos + len(r)) and pos + len(r) not in seen:
                seen.add(pos + len(r))
                yield pos + len(r)
        e = real.find(nxt, pos)
        while e >= 0:
            if e not in seen:
                seen.add(e)
                yield e
            e = real.find(nxt, e + 1)

    failed: set[tuple[int, int]] = set()
    chosen: list[tuple[int, int]] = []
    stack = [(0, len(pieces[0]), ends(0, len(pieces[0])))]
    while stack:
        k, pos, options = stack[-1]
        e = next(options, None)
        if e is None:
            failed.add((k, pos))
            stack.pop()
            if chosen:
                chosen.pop()
            continue
        if k == n - 1:
            return [*chosen, (pos, e)]
        nxt = e + len(pieces[k + 1])
        if (k + 1, nxt) in failed:
            continue
        chosen.append((pos, e))
        stack.append((k + 1, nxt, ends(k + 1, nxt)))
    return None


def _mismatch(pieces: list[str], real: str) -> str:
    """Say which template text of the stand-in render the real render lacks (content-dependent templates)."""
    at = 0
    for k, piece in enumerate(pieces):
        found = real.find(piece, at)
        if found < 0 or (k == 0 and found != 0):
            return (
                f"the chat template renders this conversation differently around its contents: the text "
                f"{piece[:60]!r} it writes with stand-in contents is missing from the real render after "
                f"{real[max(at - 30, 0) : at]!r}, so the answers cannot be located (the template changes its "
                "layout depending on what the messages say)"
            )
        at = found + len(piece)
    return "the chat template renders this conversation in a way its answers cannot be located in"


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
