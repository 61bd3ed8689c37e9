"""Loss masks under 18 published chat templates (tests/fixtures/templates, sources cited there), swapped into the
built-in tokenizer: for single-turn, multi-turn, system prompt, whitespace-edged answers and reasoning, the
trained text is exactly each answer as the template renders it plus its end-of-turn marker (checked on the
characters, and on the decoded trained tokens, where a token may carry one whitespace character of the template
before an answer). Also: the template checks that fail before training, and `sft train` end to end on the
families whose masks used to fail (DESIGN invariant 12)."""

from __future__ import annotations

import copy
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from sft.config import DataConfig, DataSource
from sft.data import load_samples
from sft.data.chat import IGNORE_INDEX, render_chat, tokenize_chat, tokenize_rendered
from sft.data.collate import as_item, pack_collate, pad_collate
from sft.data.template import template_profile
from sft.errors import SftError
from tests.conftest import TEMPLATES, swap_template

FAMILIES = sorted(p.stem for p in TEMPLATES.glob("*.jinja"))
DEFAULT_OPEN, DEFAULT_CLOSE = "<think>\n", "\n</think>\n\n"


def spec(name: str) -> dict[str, Any]:
    return json.loads((TEMPLATES / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def family_tokenizer(tokenizer: Any) -> Any:
    return cache(lambda name: swap_template(tokenizer, name))


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str, reasoning: str | None = None) -> dict[str, str]:
    m = {"role": "assistant", "content": text}
    return m if reasoning is None else {**m, "reasoning_content": reasoning}


SYSTEM = {"role": "system", "content": "You are terse."}
CASES = {
    "single": [user("Name a prime."), assistant("Seven.")],
    "multi": [user("Name a prime."), assistant("Seven."), user("Another one?"), assistant("Eleven, and 13.")],
    "system": [SYSTEM, user("Name a prime."), assistant("Seven."), user("Another?"), assistant("Eleven.")],
    "whitespace": [
        user("Name a prime."),
        assistant("  Seven. \n"),
        user("Another?"),
        assistant(" Eleven.\n\n"),
    ],
}


def expected(s: dict[str, Any], messages: list[dict[str, str]]) -> list[str]:
    """What each assistant turn must train, from the fixture's description of its template."""
    out = []
    last = len(messages) - 1
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            answer = m["content"] if s["answer"] == "as_is" else m["content"].strip()
            marker = s["eot_last"] if i == last else s["eot"]
            out.append(s["lead"] + answer + (marker or ""))
    return out


def chat_file(path: Path, conversations: list[list[dict[str, str]]]) -> Path:
    """A messages-format .jsonl file of these conversations."""
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    return path


def check_mask(tok: Any, messages: list[dict[str, str]], want: list[str], **kw: Any) -> None:
    chat = render_chat(tok, messages, **kw)
    assert [chat.text[a:b] for a, b in chat.spans] == want, chat.text
    sample = tokenize_rendered(tok, chat)
    got = tok.decode(
        [t for t, lab in zip(sample.input_ids, sample.labels, strict=True) if lab != IGNORE_INDEX]
    )
    # a token may join the template's last whitespace character before an answer to the answer's first one
    assert re.fullmatch("".join(r"[ \n]?" + re.escape(w) for w in want), got), (got, want)
    untrained = tok.decode(
        [t for t, lab in zip(sample.input_ids, sample.labels, strict=True) if lab == IGNORE_INDEX]
    )
    for m in (
        messages
    ):  # every prompt text is there, untrained (Mistral v3/Nemo show the system one in the prompt)
        if m["role"] == "user":
            assert m["content"].strip() in untrained


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", FAMILIES)
def test_trained_text_is_each_answer_and_its_end_of_turn(family_tokenizer: Any, name: str, case: str) -> None:
    tok, s, messages = family_tokenizer(name), spec(name), CASES[case]
    if (
        case == "system" and s["system"] == "refuse"
    ):  # Gemma 2: an error that says what to do, before training
        with pytest.raises(
            SftError, match=r"refuses a system turn \(System role not supported\).*system_role=merge"
        ):
            render_chat(tok, messages)
        return
    check_mask(tok, messages, expected(s, messages))
    if case == "system":
        chat = render_chat(tok, messages)
        assert SYSTEM["content"] in chat.text
        if s["system"] == "last_user":  # shown inside the last user turn, before the last answer
            assert chat.text.index(SYSTEM["content"]) > chat.text.index("Seven.")
            assert any("only when a conversation ends with a user turn" in q for q in chat.quirks)


def reasoning_expected(s: dict[str, Any], messages: list[dict[str, str]], keep: bool) -> list[str]:
    opener = s.get("reasoning_open", DEFAULT_OPEN)
    closer = s.get("reasoning_close", DEFAULT_CLOSE)
    if s.get("prompt_opens_reasoning"):
        opener = ""  # the generation prompt already holds it: not the model's to write
    out, last = [], len(messages) - 1
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        marker = (s["eot_last"] if i == last else s["eot"]) or ""
        shown = keep or (s["reasoning"] == "template" and i == last)  # the template shows it in its last turn
        if shown and m.get("reasoning_content"):
            out.append(opener + m["reasoning_content"] + closer + m["content"] + marker)
        else:
            out.append(s["lead"] + m["content"] + marker)
    return out


@pytest.mark.parametrize("mode", ["keep", "drop"])
@pytest.mark.parametrize("name", FAMILIES)
def test_reasoning_is_trained_as_asked(family_tokenizer: Any, name: str, mode: str) -> None:
    messages = [
        user("Name a prime."),
        assistant("Seven.", "Small ones: 2, 3, 5, 7."),
        user("Another one?"),
        assistant("Eleven.", "After 7 comes 11."),
    ]
    tok, s = family_tokenizer(name), spec(name)
    check_mask(tok, messages, reasoning_expected(s, messages, mode == "keep"), reasoning=mode)


def test_reasoning_inside_the_content(family_tokenizer: Any) -> None:
    """<think>...</think> in the content: Qwen3 parses it (and drops it from history), DeepSeek cuts it out of
    every answer, Llama 3 renders it as plain content."""
    think = "<think>\nSmall ones.\n</think>\n\n"
    messages = [
        user("Name a prime."),
        assistant(think + "Seven."),
        user("Another?"),
        assistant(think + "Eleven."),
    ]
    qwen3, deepseek, llama3 = (family_tokenizer(n) for n in ("qwen3", "deepseek_r1_distill", "llama3"))
    both = [think + "Seven.<|im_end|>", think + "Eleven.<|im_end|>"]
    check_mask(qwen3, messages, both, reasoning="keep")
    check_mask(qwen3, messages, ["Seven.<|im_end|>", think + "Eleven.<|im_end|>"], reasoning="drop")
    eos = "<｜end▁of▁sentence｜>"
    check_mask(
        deepseek,
        messages,
        [f"Small ones.{DEFAULT_CLOSE}Seven.{eos}", f"Small ones.{DEFAULT_CLOSE}Eleven.{eos}"],
    )
    check_mask(deepseek, messages, ["\n\nSeven." + eos, "\n\nEleven." + eos], reasoning="drop")
    verbatim = [think.strip() + "\n\nSeven.<|eot_id|>", think.strip() + "\n\nEleven.<|eot_id|>"]
    for mode in ("keep", "drop"):
        check_mask(llama3, messages, verbatim, reasoning=mode)


def test_train_on_last_assistant_and_all(family_tokenizer: Any) -> None:
    for name in ("qwen3", "phi3", "mistral_nemo"):
        tok, messages = family_tokenizer(name), CASES["system"]
        s = tokenize_chat(tok, messages, "last_assistant")
        got = tok.decode([t for t, lab in zip(s.input_ids, s.labels, strict=True) if lab != IGNORE_INDEX])
        assert got == expected(spec(name), messages)[-1]
        s = tokenize_chat(tok, messages, "all")
        assert s.labels[1:] == s.input_ids[1:]


def test_what_each_template_does_is_found_by_probing(family_tokenizer: Any) -> None:
    quirks = {name: template_profile(family_tokenizer(name)).quirks for name in FAMILIES}
    assert any("appends '<|endoftext|>' after the last answer only" in q for q in quirks["phi3"])
    assert any("generation prompt ends with '<think>\\n'" in q for q in quirks["deepseek_r1_distill"])
    assert any("'<|end|>', not a stop token" in q for q in quirks["gpt_oss"])
    assert not quirks["llama3"] and not quirks["qwen3"]
    qwen3 = render_chat(family_tokenizer("qwen3"), CASES["single"])
    assert any("inserts an empty reasoning block" in q for q in qwen3.quirks)
    assert "<think>\n\n</think>\n\n" in qwen3.text  # present, untrained
    gemma = render_chat(family_tokenizer("gemma3"), CASES["whitespace"])
    assert "the template trims whitespace at the edges of answers" in gemma.quirks


def test_system_role_merge_for_templates_without_one(tmp_path: Path, family_tokenizer: Any) -> None:
    tok = family_tokenizer("gemma2")
    path = chat_file(tmp_path / "chat.jsonl", [CASES["system"]])
    with pytest.raises(SftError, match="set data.system_role=merge"):
        load_samples([DataSource(path=str(path))], tok, DataConfig())
    (sample,), stats = load_samples([DataSource(path=str(path))], tok, DataConfig(system_role="merge"))
    text = tok.decode(sample.input_ids)
    assert "<start_of_turn>user\nYou are terse.\n\nName a prime.<end_of_turn>" in text
    got = tok.decode(
        [t for t, lab in zip(sample.input_ids, sample.labels, strict=True) if lab != IGNORE_INDEX]
    )
    assert got == "Seven.<end_of_turn>Eleven.<end_of_turn>"


def test_answers_that_contain_template_text_are_still_located(family_tokenizer: Any) -> None:
    tok = family_tokenizer("qwen2_5")
    tricky = "Use <|im_start|>assistant\n then <|im_end|>\n<|im_start|>user\n as text."
    messages = [user("Show the tags."), assistant(tricky), user("Again?"), assistant("Seven.")]
    chat = render_chat(tok, messages)
    assert [chat.text[a:b] for a, b in chat.spans] == [tricky + "<|im_end|>", "Seven.<|im_end|>"]


def test_a_template_that_renders_content_dependent_scaffolding_is_a_clear_bad_row(tokenizer: Any) -> None:
    tok = copy.deepcopy(tokenizer)
    # a made-up template whose header depends on what the user wrote: the answers cannot be located
    tok.chat_template = (
        "{% for m in messages %}{% if m.role == 'user' and 'please' in m.content %}<|im_start|>polite\n"
        "{% else %}<|im_start|>{{ m.role }}\n{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}"
    )
    messages = [user("please answer"), assistant("Seven.")]
    from sft.data.formats import BadRow

    with pytest.raises(BadRow, match="renders this conversation differently around its contents"):
        render_chat(tok, messages)


def test_a_template_without_any_stop_token_fails_before_training(tmp_path: Path, tokenizer: Any) -> None:
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    path = chat_file(tmp_path / "chat.jsonl", [CASES["multi"]])
    with pytest.raises(
        SftError, match="none of its 1 samples trains an end-of-turn token .* never learn to stop"
    ):
        load_samples([DataSource(path=str(path))], tok, DataConfig())


def test_eos_equal_to_pad_is_still_trained(family_tokenizer: Any) -> None:
    """Padding is masked by position, never by token id: with pad == eos (the built-in model, Llama 3 without a
    pad token) the answers' eos tokens keep their labels in padded and packed batches."""
    tok = family_tokenizer("llama3")
    eos = tok.convert_tokens_to_ids("<|eot_id|>")
    sample = tokenize_chat(tok, CASES["multi"])
    short = tokenize_chat(tok, CASES["single"])
    items = [as_item(sample), as_item(short)]
    for batch in (pad_collate(items, pad_id=eos), pack_collate([items], pad_id=eos)):
        labels, ids = batch["labels"], batch["input_ids"]
        assert int((labels == eos).sum()) == 3  # two answers + one answer end with <|eot_id|>, all trained
        assert int((ids == eos).sum()) > 3  # while the padding uses the same id, untrained


def test_preview_says_what_each_sources_template_did(
    tmp_path: Path, tokenizer: Any, tiny_model_dir: Path
) -> None:
    from sft.data.preview import preview
    from tests.conftest import tiny_recipe

    path = chat_file(tmp_path / "chat.jsonl", [CASES[c] for c in ("single", "multi", "system")])
    recipe = tiny_recipe(
        tiny_model_dir,
        tmp_path / "run",
        data__train=str(path),
        data__eval=str(path),
        train__micro_batch_size=1,
    )
    text = preview(recipe, swap_template(tokenizer, "qwen3"), n=1, color=False)
    assert (
        f"{path}: template: the template inserts an empty reasoning block '<think>\\n\\n</think>\\n\\n' (not trained) (3 rows)"
        in text
    )
    text = preview(recipe, swap_template(tokenizer, "phi3"), n=1, color=False)
    assert "template: the template appends '<|endoftext|>' after the last answer only" in text


def test_plain_completions_without_eos_fail_before_training(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "pc.jsonl"
    path.write_text(json.dumps({"prompt": "Two plus two is", "completion": " four."}) + "\n")
    with pytest.raises(
        SftError, match="trains the eos token, so the model would never learn to stop; set data.add_eos=true"
    ):
        load_samples([DataSource(path=str(path))], tokenizer, DataConfig(add_eos=False))
    (sample,), stats = load_samples([DataSource(path=str(path))], tokenizer, DataConfig())
    assert stats.total.stop_trained == stats.total.stop_expected == 1


@pytest.mark.parametrize("name", ["qwen3", "phi3", "phi4_mini", "mistral_nemo", "deepseek_r1_distill"])
def test_sft_train_on_the_families_that_failed_before(
    name: str, tokenizer: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`sft train` end to end, on the built-in tokenizer with the family's template swapped in, a tiny model and
    multi-turn conversations with a system prompt (half of them with reasoning): an epoch trains exactly as many
    tokens as the expected answers, reasoning and end-of-turn markers hold (DESIGN invariant 12)."""
    from sft.cli import main
    from tests.conftest import random_llama, tiny_recipe

    tok, s = swap_template(tokenizer, name), spec(name)
    rows = []
    for i in range(8):
        first = assistant(f"Seven times {i} is {7 * i}.", f"Multiply {i} by 7." if i % 2 else None)
        rows.append(
            [SYSTEM, user(f"What is 7 x {i}?"), first, user("And plus 4?"), assistant(f"{7 * i + 4}.")]
        )
    data = chat_file(tmp_path / "chat.jsonl", rows)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    recipe = tiny_recipe(
        random_llama(tmp_path / "model", tok, hidden_size=32, intermediate_size=64),
        tmp_path / "run",
        data__train=str(data),
        data__eval=str(data),
        data__max_seq_len=256,
        train__micro_batch_size=2,
        train__max_steps=4,  # one epoch: every row once
    )
    (tmp_path / "recipe.yaml").write_text(recipe.to_yaml())
    assert main(["train", str(tmp_path / "recipe.yaml")]) == 0
    assert "8 rows -> 8 samples" in capsys.readouterr().out
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = sum(r["train/trained_tokens"] for r in logged if "train/trained_tokens" in r)
    want = [t for r in rows for t in reasoning_expected(s, r, keep=True)]
    # each trained turn tokenizes as it does alone (a token may carry one whitespace character before it)
    assert trained == sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in want)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        (
            "no_trained_token",
            "2 of 8 rows (25%) give no trained token, more than data.max_untrained_share=0.1",
        ),
        ("never_stops", "none of its 8 samples trains its end-of-turn marker '<|im_end|>'"),
    ],
    ids=["no_trained_token", "never_stops"],
)
def test_sft_train_stops_before_the_first_step(
    case: str, message: str, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rows whose answers are cut away by truncation, and data where every answer loses its end-of-turn marker:
    `sft train` says so in one line (exit 2) and writes nothing."""
    from sft.cli import main
    from tests.conftest import tiny_recipe

    long = " ".join(["word"] * 60)
    if case == "no_trained_token":  # two prompts fill max_seq_len: nothing of their answers is left
        rows = [[user(long if i < 2 else "Name a prime."), assistant("Seven.")] for i in range(8)]
    else:  # every answer is longer than max_seq_len leaves it: no <|im_end|> is ever trained
        rows = [[user("Name a prime."), assistant(long)] for _ in range(8)]
    data = chat_file(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(tiny_recipe(tiny_model_dir, out, data__train=str(data), data__eval=str(data)).to_yaml())
    assert main(["train", str(recipe), "data.on_bad_row=skip", "data.max_seq_len=48"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()
