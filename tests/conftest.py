"""Shared fixtures: a tiny Llama with a tiny tokenizer, and a dataset mirror in hub schema.

Everything here is written by the tests (nothing is copied from ../shared), so the whole compare
pipeline runs end to end on CPU in seconds.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from harness import context

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_MIRROR = SHARED / "hf-mirror"
# For tests whose figures are CPU's (fp32 logits, no GPU memory, gloo ranks' references), on a GPU
# machine too: `with context.use(ON_CPU):`.
ON_CPU = context.RunContext(device="cpu")

WORDS = ("market stock shares profit loss rises falls bank rate cut growth weak strong earnings guidance "
         "the a of to in on and is was will up down bearish bullish neutral question answer yes no "
         "which what why plant water sun energy cell heat light rock").split()


def _sentence(rng: random.Random, n: int = 8) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="session")
def mirror(tmp_path_factory) -> Path:
    """Hub-schema fixtures: the two finance datasets and two lm-eval benchmarks (arc_easy, boolq)."""
    root = tmp_path_factory.mktemp("mirror")
    rng = random.Random(0)
    write_jsonl(root / "zeroshot/twitter-financial-news-sentiment/default/train.jsonl",
                [{"text": _sentence(rng), "label": i % 3} for i in range(48)])
    write_jsonl(root / "zeroshot/twitter-financial-news-sentiment/default/validation.jsonl",
                [{"text": _sentence(rng), "label": i % 3} for i in range(12)])
    for config in ("sentences_allagree", "sentences_75agree"):
        write_jsonl(root / f"takala/financial_phrasebank/{config}/train.jsonl",
                    [{"sentence": _sentence(rng), "label": i % 3} for i in range(24)])
    write_jsonl(root / "allenai/ai2_arc/ARC-Easy/test.jsonl", [
        {"id": f"fx-{i}", "question": _sentence(rng) + "?",
         "choices": {"text": [_sentence(rng, 3) for _ in range(4)], "label": list("ABCD")},
         "answerKey": "ABCD"[i % 4]} for i in range(12)])
    write_jsonl(root / "EleutherAI/wikitext_document_level/wikitext-2-raw-v1/test.jsonl",
                [{"page": " \n".join(_sentence(rng, 30) for _ in range(3))} for _ in range(3)])
    write_jsonl(root / "aps/super_glue/boolq/validation.jsonl", [
        {"question": _sentence(rng), "passage": _sentence(rng, 20), "idx": i, "label": i % 2} for i in range(12)])
    return root


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 64) with a word-level tokenizer over the fixture vocabulary."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-llama")
    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(WORDS)) + list("?:.,-0123456789ABCD"))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=1, bos_token_id=2, eos_token_id=3, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory) -> Path:
    """A copy of tasks/finance.yaml shrunk for the tiny model, with a two-benchmark suite."""
    import yaml

    from harness.config import TASKS_DIR

    d = tmp_path_factory.mktemp("tasks")
    suite = {"name": "tiny", "num_fewshot": 0,
             "tasks": [{"task": "arc_easy", "metric": "acc"}, {"task": "boolq", "metric": "acc"}],
             "perplexity": {"task": "wikitext", "batch_size": 1}}
    (d / "tiny.yaml").write_text(yaml.safe_dump(suite))
    task = yaml.safe_load((TASKS_DIR / "finance.yaml").read_text())
    task["suite"] = str(d / "tiny.yaml")
    task["training"].update(batch_size=8, max_length=64, logging_steps=1)
    for m in task["methods"].values():
        m.update(micro_batch_size=4, learning_rate=5e-3)
    task["lora"]["r"] = 4
    task["profiles"] = {"quick": {"train_examples": 32, "limit": 8, "eval_batch_size": 4, "perplexity_limit": 2,
                                  "quant_reference": True},
                        "full": {"train_examples": None, "limit": None, "eval_batch_size": 4}}
    path = d / "finance_tiny.yaml"
    path.write_text(yaml.safe_dump(task, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def run(tmp_path_factory, tiny_model, tiny_task, mirror):
    """One compare run (full, lora, qlora on the tiny model), shared by the pipeline and report tests."""
    out = tmp_path_factory.mktemp("out")
    with pytest.MonkeyPatch.context() as mp:  # session fixtures run before the function-scoped _offline
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HARNESS_CACHE", str(out / "cache"))
        # Its own baseline cache: the base and base-nf4 are evaluated here, whichever tests ran before.
        mp.setenv("HARNESS_BASELINES", str(out / "baselines"))
        result = _compare(out, tiny_model, tiny_task, mirror)
    assert result.exit_code == 0, result.output
    return out, result


def _compare(out, tiny_model, tiny_task, mirror):
    from click.testing import CliRunner

    from harness.cli import cli

    args = ["compare", "--task", str(tiny_task), "--model", str(tiny_model), "--methods", "full,lora,qlora",
            "--profile", "quick", "--mirror", str(mirror), "--run-id", "t1",
            "--results-dir", str(out / "results"), "--work-dir", str(out / "work"),
            "--device", "cpu"]  # the same run on a GPU machine, where tests compare gloo ranks' records with it
    return CliRunner().invoke(cli, args, catch_exceptions=False)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """Tests never reach for the hub, and never touch the user's model cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("HARNESS_MIRROR", raising=False)
    if "HARNESS_CACHE" not in os.environ:
        monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session", autouse=True)
def _baselines(tmp_path_factory):
    """The project's baselines/ is never written by tests: a session-wide scratch cache instead
    (session scope, so module-scoped run fixtures see it too)."""
    old = os.environ.get("HARNESS_BASELINES")
    os.environ["HARNESS_BASELINES"] = str(tmp_path_factory.mktemp("baselines"))
    yield
    if old is None:
        os.environ.pop("HARNESS_BASELINES", None)
    else:
        os.environ["HARNESS_BASELINES"] = old
