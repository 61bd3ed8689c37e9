"""The length policy: what happens to a sample longer than `max_seq_len` (truncate, drop or split).

Every outcome is returned as an event so the statistics count it; nothing is cut or dropped silently.
"""

from __future__ import annotations

from sft.data.chat import IGNORE_INDEX, Sample, trained_tokens
from sft.data.formats import NothingTrained


def has_targets(sample: Sample) -> bool:
    return trained_tokens(sample.labels) > 0


def fit_length(
    sample: Sample, max_len: int, policy: str, overlap: int = 0
) -> tuple[list[Sample], str | None, int]:
    """Apply the policy: (samples to keep, event, chunks left out as they hold no trained token).

    The event is None, truncated, dropped or split. Raises NothingTrained (a BadRow) when the row cannot give any trained token.
    """
    n = len(sample.input_ids)
    if n <= max_len:
        if not has_targets(sample):
            raise NothingTrained("nothing to train: the row has no trained token (is the answer empty?)")
        return [sample], None, 0
    if policy == "drop":
        return [], "dropped", 0
    if policy == "truncate":
        cut = Sample(sample.input_ids[:max_len], sample.labels[:max_len])
        if not has_targets(cut):
            raise NothingTrained(
                f"the row is {n} tokens and none of its first {max_len} is trained, so truncation leaves "
                "nothing to learn; raise data.max_seq_len, or use data.on_overflow=drop or split"
            )
        return [cut], "truncated", 0
    # split: chunks of max_len that start every (max_len - overlap) tokens; the repeated tokens are context
    # for the next chunk, trained only once (in the chunk before).
    stride = max_len - overlap
    chunks, empty = [], 0
    for start in range(0, n - overlap, stride):
        ids = sample.input_ids[start : start + max_len]
        labels = list(sample.labels[start : start + max_len])
        keep_from = max(overlap, 1) if start else 1  # first token; context repeated from the chunk before
        labels[:keep_from] = [IGNORE_INDEX] * min(keep_from, len(labels))
        chunk = Sample(ids, labels)
        if has_targets(chunk):
            chunks.append(chunk)
        else:
            empty += 1  # e.g. a chunk that is all prompt
    if not chunks:
        raise NothingTrained(f"the row is {n} tokens and no chunk of {max_len} holds a trained token")
    return chunks, "split", empty
