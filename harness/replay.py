"""Replay: general text mixed into an arm's training examples, a mitigation of forgetting.

    mitigation.replay: {fraction: 0.1, source: self}
    mitigation.replay: {fraction: 0.01, source: <hub id>, config: null, split: train, field: text}

`self` samples the base model from an empty context (its own distribution: no outside data, and
nothing a benchmark scores); a dataset gives plain text. Replay examples are learned on every token
(language modelling, not question answering) and make up `fraction` of the mix: fraction / (1 -
fraction) x the domain examples, drawn with the training seed. A dataset split that an evaluated
task scores is refused, and so is replay text that contains an evaluated document's text.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from harness.config import HarnessError, Replay


def count(replay: Replay, n_domain: int) -> int:
    """Replay examples for `n_domain` domain examples, so that replay / (domain + replay) = fraction."""
    return max(1, round(replay.fraction / (1 - replay.fraction) * n_domain))


SHINGLE = 13  # words: an evaluated text of at least this many found in replay text is an overlap
SHORTEST = 8  # an evaluated field of 8-12 words counts whole; shorter fields are too common to tell


def _words(text) -> list[str]:
    return re.findall(r"[a-z0-9]+", str(text).lower())


def _shingles(docs: list[dict]) -> dict[int, dict[tuple, int]]:
    """{length: {word n-gram: doc index}} over each document's longest text field (the passage,
    context or page an evaluated prompt is built from)."""
    out: dict[int, dict[tuple, int]] = {}
    for i, doc in enumerate(docs):
        fields = [v for v in doc.values() if isinstance(v, str)]
        if not fields:
            continue
        words = _words(max(fields, key=len))
        if len(words) < SHORTEST:
            continue
        n = min(SHINGLE, len(words))
        grams = out.setdefault(n, {})
        for j in range(len(words) - n + 1):
            grams.setdefault(tuple(words[j:j + n]), i)
    return out


def check(replay: Replay, evaluated: list[str], *, mirror: Path | None, n_domain: int) -> None:
    """Before any weight loads: the replay dataset exists and has the field; it is not a split an
    evaluated task scores; and no evaluated document's text (13 words in a row of its longest field,
    or all of a field of 8-12 words) occurs in a replay text: a replayed test document would be
    learned, then scored."""
    if replay.source == "self":
        return
    from harness.data import load_split
    from harness.evaluate import eval_task, scoring

    where = f"mitigation.replay: dataset {replay.source} ({replay.config or 'default'}/{replay.split})"
    task = scoring(evaluated, replay.source, replay.config, replay.split, mirror=mirror)
    if task is not None:
        raise HarnessError(f"{where}: is the split that evaluated task {task} scores; replay another split "
                           "or another dataset")
    ds = load_split(replay.source, replay.config, replay.split, mirror=mirror)
    if replay.field not in ds.column_names:
        raise HarnessError(f"{where}: no field '{replay.field}'; its fields are {', '.join(ds.column_names)}")
    _enough([t for t in ds[replay.field] if str(t).strip()], replay, n_domain)
    grams: dict[int, dict[tuple, tuple[str, int]]] = {}  # every evaluated task's n-grams, one pass over replay
    for task in evaluated:
        for n, table in _shingles(list(eval_task(task, mirror=mirror).eval_docs)).items():
            merged = grams.setdefault(n, {})
            for gram, doc in table.items():
                merged.setdefault(gram, (task, doc))
    for row, text in enumerate(ds[replay.field]):
        words = _words(text)
        for n, table in grams.items():
            for j in range(len(words) - n + 1):
                hit = table.get(tuple(words[j:j + n]))
                if hit is not None:
                    raise HarnessError(f"{where}: row {row} contains text of document {hit[1]} of evaluated task "
                                       f"{hit[0]}; remove it from the replay data")


def _enough(texts: list, replay: Replay, n_domain: int) -> list:
    n = count(replay, n_domain)
    if len(texts) < n:
        raise HarnessError(f"mitigation.replay: dataset {replay.source} ({replay.config or 'default'}/{replay.split}) "
                           f"has {len(texts)} non-empty rows; fraction {replay.fraction} of {n_domain} domain examples "
                           f"needs {n}")
    return texts


def examples(replay: Replay, n_domain: int, tokenizer, *, seed: int, max_length: int, mirror: Path | None,
             model_path: str) -> tuple[list[dict], dict]:
    """Tokenized replay examples (every token learned) and their record for the run."""
    n = count(replay, n_domain)
    if replay.source == "self":
        texts = _self_samples(model_path, tokenizer, n, seed=seed, max_new_tokens=min(replay.max_new_tokens, max_length))
    else:
        from harness.data import load_split

        ds = load_split(replay.source, replay.config, replay.split, mirror=mirror).shuffle(seed=seed)
        texts = _enough([t for t in ds[replay.field] if str(t).strip()], replay, n_domain)[:n]
    out = []
    for text in texts:
        ids = tokenizer(str(text), add_special_tokens=False)["input_ids"][:max_length]
        if len(ids) >= 2:
            out.append({"input_ids": ids, "labels": list(ids)})
    record = {"source": replay.source, "config": replay.config, "split": replay.split if replay.source != "self" else None,
              "fraction": replay.fraction, "examples": len(out), "tokens": sum(len(e["input_ids"]) for e in out)}
    return out, record


def _self_samples(model_path: str, tokenizer, n: int, *, seed: int, max_new_tokens: int) -> list[str]:
    """n samples of the base model from an empty context (its BOS token, or EOS where it has none),
    temperature 1, seeded: text from the base's own distribution."""
    import torch
    from transformers import set_seed
    from tqdm.auto import tqdm

    from harness import models

    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise HarnessError("mitigation.replay.source self: the tokenizer has neither a BOS nor an EOS token to start from")
    model = models.load_base(model_path)
    model.eval()
    set_seed(seed)
    device = next(model.parameters()).device
    batch = 64 if device.type == "cuda" else 16
    texts = []
    with torch.no_grad():
        for i in tqdm(range(0, n, batch), total=math.ceil(n / batch), desc="replay: base samples", leave=False):
            k = min(batch, n - i)
            ids = torch.full((k, 1), start, dtype=torch.long, device=device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_p=1.0,
                                 top_k=0, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id or start)
            texts += tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True)
    del model
    return texts
