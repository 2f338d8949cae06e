"""The baseline cache: a second compare on the same base skips the base evaluation."""

from __future__ import annotations

import json

from click.testing import CliRunner

from harness import baselines
from harness.cli import cli


def _compare(tiny_task, tiny_model, mirror, out, run_id, *extra):
    args = ["compare", "--task", str(tiny_task), "--model", str(tiny_model), "--methods", "full", "--profile",
            "quick", "--mirror", str(mirror), "--run-id", run_id, "--results-dir", str(out / "results"),
            "--work-dir", str(out / "work"), "--baselines-dir", str(out / "baselines"), *extra]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads((out / "results/finance/" / run_id / "arms/base.json").read_text()), result.output


def test_second_compare_reuses_the_baseline(tmp_path, tiny_model, tiny_task, mirror):
    first, _ = _compare(tiny_task, tiny_model, mirror, tmp_path, "a")
    assert first["baseline"]["tasks"] == []
    stored = sorted((tmp_path / "baselines").rglob("*.json"))
    assert len(stored) == len(first["results"]) + 1  # each task, and the perplexity task
    second, log = _compare(tiny_task, tiny_model, mirror, tmp_path, "b")
    assert sorted(second["baseline"]["tasks"]) == sorted([*first["results"], "wikitext"])
    assert second["results"] == first["results"] and second["n"] == first["n"]
    assert second["perplexity"]["word_perplexity"] == first["perplexity"]["word_perplexity"]
    assert "base: baseline reused for 5 of 5 tasks" in log and "saved about" in log
    assert "base: evaluating" not in log
    samples = lambda run: (tmp_path / "results/finance" / run / "samples/base.csv").read_text()  # noqa: E731
    assert samples("a") == samples("b")  # paired statistics see the same per-document records
    third, _ = _compare(tiny_task, tiny_model, mirror, tmp_path, "c", "--refresh-baseline")
    assert third["baseline"]["tasks"] == [] and third["results"] == first["results"]


def test_a_changed_limit_or_model_is_a_miss(tmp_path, tiny_model):
    k = dict(model_sha="m" * 64, task="arc_easy", task_sha="t" * 64, limit=10, seed=0, num_fewshot=0, quant=None,
             device="cpu", dtype="float32")
    baselines.store(tmp_path, baselines.key(**k), results={"acc": 0.5}, n=10, version=1.0,
                    samples=[{"doc_id": 1, "acc": 1.0}, {"doc_id": 0, "acc": 0.0}], seconds=2.0, source={})
    hit = baselines.lookup(tmp_path, baselines.key(**k))
    assert hit["results"] == {"acc": 0.5} and baselines.samples_of(hit)[0] == {"doc_id": 0, "acc": 0.0}
    assert baselines.lookup(tmp_path, baselines.key(**{**k, "limit": 20})) is None
    assert baselines.lookup(tmp_path, baselines.key(**{**k, "model_sha": "n" * 64})) is None
    assert baselines.lookup(tmp_path, baselines.key(**{**k, "quant": {"load_in_4bit": True}})) is None


def test_model_hash_follows_content_not_path(tmp_path, tiny_model):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    (copy / ".harness-sha256.json").unlink(missing_ok=True)
    assert baselines.model_sha256(copy) == baselines.model_sha256(tiny_model)
    (copy / "config.json").write_text((copy / "config.json").read_text().replace("64", "65", 1))
    assert baselines.model_sha256(copy) != baselines.model_sha256(tiny_model)


def test_model_hash_ignores_where_the_gguf_was_converted_from(tmp_path, tiny_model):
    """The same conversion under two home directories (or cache dirs) finds the same baselines."""
    import shutil

    from harness.models import PROVENANCE_FILE

    digests = []
    for home in ("/root", "/home/alice"):
        copy = tmp_path / home.strip("/").replace("/", "_")
        shutil.copytree(tiny_model, copy)
        (copy / ".harness-sha256.json").unlink(missing_ok=True)
        (copy / PROVENANCE_FILE).write_text(json.dumps(
            {"source": "gguf", "gguf": f"{home}/.cache/harness/gguf/m.gguf", "detail": "GGUF m.gguf"}))
        digests.append(baselines.model_sha256(copy))
    assert digests[0] == digests[1] == baselines.model_sha256(tiny_model)


def test_ifeval_entries_from_before_seeded_checks_are_not_reused():
    from harness.evaluate import TaskRun
    from harness.references import run_extra as _run_extra

    assert _run_extra(TaskRun("ifeval", chat_template=True, max_gen_toks=256)) == {
        "chat_template": True, "max_gen_toks": 256, "checks": "seeded"}
    assert _run_extra(TaskRun("arc_easy")) == {}  # other tasks keep their earlier keys
