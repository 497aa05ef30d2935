"""Examples (dicts of lists) -> batches (dicts of tensors), and packing of short SFT examples into rows.

    python -m pytest -q tests/test_tokenize.py

Batch shapes (docs/architecture.md, "Contracts"):
- `collate_causal`: `input_ids` [B,T] (right-padded with `pad_id`), `labels` [B,T] (-100 on padding),
  optional `loss_weight` [B,T] float; and either `attention_mask` [B,T] (unpacked rows) or `position_ids`
  [B,T] (packed rows, no `attention_mask`).
- `collate_classify`: `input_ids` [B,T], `attention_mask` [B,T], `labels` [B].
- `collate_preference`: `chosen_input_ids`, `chosen_labels`, `chosen_attention_mask`, `rejected_input_ids`,
  `rejected_labels`, `rejected_attention_mask`, all [B,T] with one T for both sides, so an objective can
  concatenate them into one [2B,T] forward pass.

Why packed batches carry no attention_mask: transformers 5 builds a block-diagonal causal mask from
`position_ids` (masking_utils.find_packed_sequence_indices: a new sequence starts wherever the position
does not grow by 1) only when `attention_mask is None` and there is no KV cache (the forward must get
`use_cache=False`). With any 2-D attention_mask, even all ones, the rows attend across documents. So a
packed batch gives position_ids only, and its padding is laid out as one more "document" (positions from
0, labels -100) that real tokens never attend to. See docs/models.md for each attention implementation.
"""

from __future__ import annotations

from bisect import bisect_left, insort

import torch

IGNORE = -100  # the label of a position that is not a target (the default ignore_index of torch's cross_entropy)


def _pad(rows: list[list], value, length: int) -> list[list]:
    return [list(r) + [value] * (length - len(r)) for r in rows]


def collate_causal(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad causal-LM examples to the longest one. Packed examples (with position_ids) stay unmasked."""
    T = max(len(ex["input_ids"]) for ex in examples)
    batch = {
        "input_ids": torch.tensor(_pad([ex["input_ids"] for ex in examples], pad_id, T), dtype=torch.long),
        "labels": torch.tensor(_pad([ex["labels"] for ex in examples], IGNORE, T), dtype=torch.long),
    }
    if any("position_ids" in ex for ex in examples):
        rows = []
        for ex in examples:
            pos = list(ex.get("position_ids", range(len(ex["input_ids"]))))
            rows.append(pos + list(range(T - len(pos))))  # padding: its own sequence, starting at 0
        batch["position_ids"] = torch.tensor(rows, dtype=torch.long)
    else:
        batch["attention_mask"] = torch.tensor([[1] * len(ex["input_ids"]) + [0] * (T - len(ex["input_ids"]))
                                                for ex in examples], dtype=torch.long)
    if any("loss_weight" in ex for ex in examples):
        weights = [ex.get("loss_weight") or [1.0 if t != IGNORE else 0.0 for t in ex["labels"]] for ex in examples]
        batch["loss_weight"] = torch.tensor(_pad(weights, 0.0, T), dtype=torch.float32)
    return batch


def pack_examples(examples: list[dict], max_length: int) -> list[dict]:
    """Pack SFT examples into rows of at most `max_length` tokens (best-fit decreasing, deterministic).

    Each row gets `position_ids` restarting at 0 for every example, so that attention stays inside each
    example (see the module docstring for when transformers honours that). The first label of each example
    is set to -100: it would be predicted from the previous example's last token.
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, row index), sorted
    for i in order:
        n = len(examples[i]["input_ids"])
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens, more than max_length={max_length}; truncate or drop it first")
        k = bisect_left(free, (n, -1))
        if k < len(free):
            cap, r = free.pop(k)
            rows[r].append(i)
            if cap - n > 0:
                insort(free, (cap - n, r))
        else:
            rows.append([i])
            if max_length - n > 0:
                insort(free, (max_length - n, len(rows) - 1))
    has_weight = any("loss_weight" in ex for ex in examples)
    packed = []
    for members in rows:
        members.sort()  # original order inside a row: deterministic and readable
        row: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
        if has_weight:
            row["loss_weight"] = []
        for i in members:
            ex = examples[i]
            row["input_ids"] += ex["input_ids"]
            row["labels"] += [IGNORE] + list(ex["labels"][1:])
            row["position_ids"] += list(range(len(ex["input_ids"])))
            if has_weight:
                w = ex.get("loss_weight") or [1.0 if t != IGNORE else 0.0 for t in ex["labels"]]
                row["loss_weight"] += [0.0] + list(w[1:])
        packed.append(row)
    return packed


def collate_classify(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad classification examples; `labels` [B] are the class indices."""
    T = max(len(ex["input_ids"]) for ex in examples)
    return {
        "input_ids": torch.tensor(_pad([ex["input_ids"] for ex in examples], pad_id, T), dtype=torch.long),
        "attention_mask": torch.tensor([[1] * len(ex["input_ids"]) + [0] * (T - len(ex["input_ids"])) for ex in examples],
                                       dtype=torch.long),
        "labels": torch.tensor([ex["label"] for ex in examples], dtype=torch.long),
    }


def collate_preference(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen and rejected sides padded to one common length T (see the module docstring)."""
    T = max(max(len(ex["chosen_input_ids"]), len(ex["rejected_input_ids"])) for ex in examples)
    batch = {}
    for side in ("chosen", "rejected"):
        ids = [ex[f"{side}_input_ids"] for ex in examples]
        batch[f"{side}_input_ids"] = torch.tensor(_pad(ids, pad_id, T), dtype=torch.long)
        batch[f"{side}_labels"] = torch.tensor(_pad([ex[f"{side}_labels"] for ex in examples], IGNORE, T), dtype=torch.long)
        batch[f"{side}_attention_mask"] = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in ids], dtype=torch.long)
    return batch
