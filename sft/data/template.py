"""What a tokenizer's chat template does, learned by rendering conversations of unique stand-in words.

A stand-in (`SFTSTANDIN3Q`) survives whatever a template does to text (trim, split at `</think>`), so the
template text around the stand-ins of a render is the template's own scaffolding, and comparing renders says:

- which text ends an answer: the end-of-turn marker (`<|im_end|>`, `<|eot_id|>`, `</s>`, ...) is the template
  text after an answer up to and including its first special token, when the same marker also closes the last
  answer of a conversation (text that only follows answers with another turn after them is the next turn's
  header, not a marker) or when it is the eos token;
- how the template writes a reasoning block (`<think>\\n` ... `\\n</think>\\n\\n`, gpt-oss's analysis channel),
  so an empty one inserted by the template is recognised (not trained) and reasoning the template drops from
  history can be put back (`data.reasoning: keep`);
- whether it refuses a system turn, and what it does differently at the end of a conversation.

`sft.data.chat` uses the profile to locate and mask the answers of every row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sft.errors import SftError

STAND_IN = "SFTSTANDIN"
DEFAULT_REASONING = (
    "<think>\n",
    "\n</think>\n\n",
)  # the common format, for templates that never show reasoning


def stand_in(n: int, salt: str = "") -> str:
    """The n-th unique stand-in word (letters only after the digits, so no two are prefixes of each other)."""
    return f"{STAND_IN}{salt}{n}Q"


def render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    assert isinstance(text, str)
    return text


def special_strings(tokenizer: Any) -> list[str]:
    """Every special token's text (the named ones and added tokens flagged special)."""
    names = {str(t) for t in tokenizer.all_special_tokens}
    names |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    return sorted((n for n in names if n), key=len, reverse=True)


def through_first_special(text: str, specials: list[str]) -> str | None:
    """`text` up to and including its first special token (the longest one where several start), else None."""
    best: tuple[int, int] | None = None
    for s in specials:  # longest first: at equal positions the longer token wins
        i = text.find(s)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, len(s))
    return None if best is None else text[: best[0] + best[1]]


def common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass
class TemplateProfile:
    eot_mid: (
        str | None
    )  # trained after an answer that another turn follows (None: nothing there stops the model)
    eot_last: str | None  # trained after the last answer of a conversation
    reasoning_open: str  # the template's text before reasoning, after the generation prompt
    reasoning_close: str  # between reasoning and the answer
    refuses_system: str | None  # the template's error on a system turn, or None
    stop_ids: set[int] = field(default_factory=set)  # token ids of the markers' special tokens
    quirks: list[str] = field(default_factory=list)  # template-wide behaviour, said once per source

    @property
    def empty_reasoning(self) -> str:
        return self.reasoning_open + self.reasoning_close


def _between(text: str, before: str, after: str) -> str:
    start = text.index(before) + len(before)
    return text[start : text.index(after, start)]


def template_profile(tokenizer: Any) -> TemplateProfile:
    """Probe the template with stand-in conversations (a handful of renders, once per source)."""
    if not getattr(tokenizer, "chat_template", None):
        raise SftError(
            "the model's tokenizer has no chat template, so chat rows cannot be rendered; "
            "use an instruct model's tokenizer, or train raw text with format: text"
        )
    u0, a0, u1, a1, r0, s0 = (stand_in(i) for i in range(6))
    plain = [
        {"role": "user", "content": u0},
        {"role": "assistant", "content": a0},
        {"role": "user", "content": u1},
        {"role": "assistant", "content": a1},
    ]
    try:
        text = render(tokenizer, plain, False)
        prompt = render(tokenizer, plain[:1], True)
    except Exception as e:
        raise SftError(
            f"the chat template fails on a plain user/assistant conversation ({type(e).__name__}: {e}); "
            "check model.name or the tokenizer's chat_template"
        ) from None
    specials = special_strings(tokenizer)
    eos = tokenizer.eos_token or ""
    t_mid = _between(text, a0, u1)
    t_last = text[text.index(a1) + len(a1) :]
    eot_last = through_first_special(t_last, specials)
    mid = through_first_special(t_mid, specials)
    eot_mid = mid if mid is not None and (mid == eot_last or (bool(eos) and mid.endswith(eos))) else None
    quirks = []
    if eot_last is not None and through_first_special(t_last[len(eot_last) :], specials):
        quirks.append(
            f"the template appends {t_last[len(eot_last) :].strip()!r} after the last answer only "
            f"(not trained; {eot_last.strip()!r} ends every answer)"
        )
    if mid is not None and eot_mid is None:
        quirks.append(
            f"answers followed by another turn end with {mid.strip()!r}, not a stop token (not trained)"
        )
    tail = prompt[prompt.index(u0) + len(u0) :]
    header = _between(text, u0, a0)
    extra = tail[common_prefix(tail, header) :]
    if extra:
        quirks.append(
            f"the generation prompt ends with {extra!r}, which the template does not put before answers "
            "in a conversation (answers are trained as the conversation renders them)"
        )
    open_, close = _reasoning_format(tokenizer, u0, a0, r0, tail)
    refuses = None
    try:
        render(tokenizer, [{"role": "system", "content": s0}, *plain[:2]], False)
    except Exception as e:
        refuses = str(e) or type(e).__name__
    stop_ids: set[int] = set()
    for marker in (eot_mid, eot_last):
        for s in specials:
            if marker and marker.endswith(s):
                stop_ids.add(tokenizer.convert_tokens_to_ids(s))
                break
    return TemplateProfile(eot_mid, eot_last, open_, close, refuses, stop_ids, quirks)


def _reasoning_format(tokenizer: Any, u0: str, a0: str, r0: str, tail: str) -> tuple[str, str]:
    """(text before reasoning, text between reasoning and answer): as the template writes a reasoning field
    (`reasoning_content`, gpt-oss's `thinking`), else as it writes <think> in the content, else the default."""
    tries = [
        {"role": "assistant", "content": a0, "reasoning_content": r0, "thinking": r0},
        {"role": "assistant", "content": f"<think>\n{r0}\n</think>\n\n{a0}"},
    ]
    for message in tries:
        try:
            text = render(tokenizer, [{"role": "user", "content": u0}, message], False)
        except Exception:
            continue
        if r0 in text and text.index(r0) < text.index(a0):
            header = _between(text, u0, r0)
            return header[common_prefix(tail, header) :], _between(text, r0, a0)
    return DEFAULT_REASONING
