"""The report stage on the shared tiny compare run: provenance, resources, plots, failed arms, formats."""

from __future__ import annotations

import json
import shutil

from click.testing import CliRunner

from harness import baselines
from harness.cli import cli
from harness.data import file_sha256


def _run_dir(run):
    out, _ = run
    return out / "results/finance/t1"


def test_provenance_recorded(run, tiny_model, mirror):
    config = json.loads((_run_dir(run) / "config.json").read_text())
    expected = baselines.model_sha256(tiny_model)
    assert config["model"]["content_sha256"] == expected and len(expected) == 64
    by_use = {d["used_for"]: d for d in config["datasets"]}
    assert set(by_use) == {"train", "arc_easy", "boolq", "finance_tweets", "finance_phrasebank", "wikitext"}
    train = by_use["train"]
    assert (train["id"], train["split"], train["rows"]) == ("zeroshot/twitter-financial-news-sentiment", "train", 48)
    assert train["sha256"] == file_sha256(mirror / "zeroshot/twitter-financial-news-sentiment/default/train.jsonl")
    assert (by_use["boolq"]["id"], by_use["boolq"]["split"], by_use["boolq"]["rows"]) == ("aps/super_glue", "validation", 12)
    env = config["environment"]
    for key in ("python", "platform", "cpu", "cpu_count", "gpu", "gpu_count", "cuda", "git_commit"):
        assert key in env, key
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "lm_eval", "datasets"):
        assert env["packages"][pkg], pkg
    metrics = json.loads((_run_dir(run) / "metrics.json").read_text())
    assert metrics["provenance"]["model"]["content_sha256"] == expected
    md = (_run_dir(run) / "report.md").read_text()
    assert expected in md and "## Provenance" in md and "### Datasets" in md and "Resolved configuration" in md


def test_resources_table_has_every_arm_and_stage(run):
    md = (_run_dir(run) / "report.md").read_text()
    resources = md.split("## Resources")[1].split("## Plots")[0]
    assert "| base | eval |" in resources
    for arm in ("full", "lora", "qlora"):
        assert f"| {arm} | train |" in resources and f"| {arm} | eval |" in resources, arm
        kl_row = next(r for r in resources.splitlines() if r.startswith(f"| {arm} | KL to base |"))
        assert "–" not in kl_row.split("|")[7], kl_row  # peak RSS recorded (CPU's measure)
        assert f"| {arm} | " in resources.split("### Parameters and storage")[1], arm
    assert "full checkpoint" in resources and "adapter" in resources and "4-bit NF4" in resources


def test_plots_and_lm_eval_layout(run):
    run_dir = _run_dir(run)
    for stem in ("scores", "tradeoff", "resources", "heatmap"):  # three trained arms: a heat map
        assert (run_dir / f"{stem}.png").stat().st_size > 0 and (run_dir / f"{stem}.svg").stat().st_size > 0, stem
    md = (run_dir / "report.md").read_text()
    for stem in ("scores", "tradeoff", "resources", "heatmap"):
        assert f"]({stem}.png)" in md, stem
    m = json.loads((run_dir / "metrics.json").read_text())
    base = m["arms"]["base"]
    assert base["lm_eval"]["results"]["arc_easy"]["acc,none"] == base["tasks"]["arc_easy"]["score"]
    assert base["lm_eval"]["n-samples"]["arc_easy"]["effective"] == 8
    assert "word_perplexity,none" in base["lm_eval"]["results"]["wikitext"]
    assert "tokens/s" in m["summary"] and "stores a" in m["summary"]


def _reported_with_failed(run, tmp_path, arm: str, stage: str, error: str):
    """`harness report` on a copy of the run whose `arm` is recorded as failed with `error`."""
    run_dir = tmp_path / "t1"
    shutil.copytree(_run_dir(run), run_dir)
    (run_dir / f"arms/{arm}.json").write_text(json.dumps({"arm": arm, "status": "failed", "inputs": "x",
                                                          "stage": stage, "error_type": "OutOfMemoryError",
                                                          "error": error}))
    return run_dir, CliRunner().invoke(cli, ["report", str(run_dir)])


def test_failed_arm_is_reported_not_dropped(run, tmp_path):
    run_dir, result = _reported_with_failed(run, tmp_path, "lora", "training",
                                            "torch.OutOfMemoryError: CUDA out of memory")
    assert result.exit_code == 0, result.output
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["failed_arms"] == {"lora": "torch.OutOfMemoryError: CUDA out of memory"}
    assert "lora" not in m["arms"] and "lora" not in m["missing_arms"]
    md = (run_dir / "report.md").read_text()
    assert "**Failed arms:** lora: `torch.OutOfMemoryError: CUDA out of memory`" in md
    assert "**lora** failed" in m["summary"]


def test_a_failed_base_is_named_with_its_error(run, tmp_path):
    """Every comparison needs the base: without it no report, and the error says why it is absent."""
    run_dir, result = _reported_with_failed(run, tmp_path, "base", "evaluating",
                                            "CUDA out of memory. Tried to allocate 2.00 GiB")
    assert result.exit_code == 2, result.output
    assert (f"Error: {run_dir}/arms/base.json: the base evaluation failed: CUDA out of memory. Tried to allocate "
            "2.00 GiB") in result.output


def test_report_without_provenance_or_resources(run, tmp_path):
    """Runs recorded before provenance and resource fields still get a complete report."""
    run_dir = tmp_path / "t1"
    shutil.copytree(_run_dir(run), run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    config["model"].pop("content_sha256")
    config.pop("datasets")
    config.pop("schema_version")  # records of that time had none: version 1, migrated on reading
    (run_dir / "config.json").write_text(json.dumps(config))
    for arm in ("base", "full"):
        rec = json.loads((run_dir / f"arms/{arm}.json").read_text())
        rec.pop("eval_resources", None)
        rec.pop("schema_version")
        (run_dir / f"arms/{arm}.json").write_text(json.dumps(rec))
    result = CliRunner().invoke(cli, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    md = (run_dir / "report.md").read_text()
    assert "not recorded (the run predates content hashing)" in md
    assert "| train | zeroshot/twitter-financial-news-sentiment | default | train | 48 | not recorded |" in md


def test_training_on_cuda_graphs_is_said_beside_the_memory():
    from harness import report

    train = {"method": "qlora", "steps": 597, "epochs": 1.0, "batch_size": 16, "learning_rate": 2e-4,
             "train_loss": 0.56, "compute_dtype": "bfloat16", "cuda_graphs": True, "padded_length": 1472}
    metrics = {"arms": {"base": {"train": None}, "qlora": {"train": train},
                        "full": {"train": {**train, "method": "full", "cuda_graphs": False, "padded_length": None}}}}
    blocks = report._training(metrics)
    assert blocks[0] == ("h", 2, "Training") and len(blocks[1][2]) == 2
    note = blocks[2][1]
    assert "qlora" in note and "full" not in note and "1472 tokens" in note and "cuda_graphs=false" in note
    train["cuda_graphs"] = False
    assert len(report._training(metrics)) == 2  # no graphs, no note


def test_the_summary_names_the_arm_with_the_lowest_general_change(run):
    from harness import report

    metrics = json.loads((_run_dir(run) / "metrics.json").read_text())
    deltas = {a: c["forgetting"]["delta"] for a, c in metrics["comparisons"].items()
              if c["forgetting"] and a in ("full", "lora", "qlora")}
    lowest = min(deltas, key=deltas.get)
    text = report.summary(metrics, [], [])
    assert f"Lowest mean general change: {lowest} ({100 * deltas[lowest]:+.1f} points)" in text


def test_the_report_says_how_tasks_were_prompted_where_not_plain():
    from harness import report

    def runs(*extra):
        plain = [{"task": t, "num_fewshot": 0, "chat_template": False} for t in ("arc_easy", "boolq")]
        return {"evaluation": {"runs": plain[:2 - len(extra)] + list(extra)}}

    assert report._prompts(runs()) == []
    chat = {"task": "ifeval", "num_fewshot": 0, "chat_template": True}
    assert report._prompts(runs(chat)) == ["**Prompts** ifeval: chat template; the other tasks zero-shot plain text."]
    told = {"task": "boolq", "num_fewshot": 2, "chat_template": True, "fewshot_as_multiturn": False,
            "system_instruction": "answer yes or no"}
    assert report._prompts(runs(chat, told)) == [
        "**Prompts** ifeval: chat template; boolq: 2-shot in one turn, chat template, system prompt “answer yes or "
        "no”."]


def test_the_training_table_gives_the_mean_loss_and_where_it_ended():
    """The Trainer's training_loss is the mean over all steps: labelled so, beside the last logged window."""
    from harness import report

    train = {"method": "full", "steps": 597, "epochs": 1.0, "batch_size": 16, "learning_rate": 2e-5,
             "train_loss": 0.5464, "compute_dtype": "float32",
             "loss_history": [{"step": 580, "loss": 0.2793}, {"step": 590, "loss": 0.2415}]}
    short = {**train, "steps": 8, "loss_history": []}  # ended before its first log
    metrics = {"arms": {"base": {"train": None}, "full": {"train": train}, "lora": {"train": short}}}
    (_, header, rows) = report._training(metrics)[1]
    by_column = [dict(zip(header, row)) for row in rows]
    assert [(r["mean loss"], r["last logged loss"]) for r in by_column] == [("0.5464", "0.2415 (step 590)"),
                                                                            ("0.5464", "–")]
    assert "final loss" not in header


def test_a_not_significant_delta_says_what_this_n_could_detect():
    from harness.report import _score_table

    comp = {"delta": 0.01, "ci_low": -0.02, "ci_high": 0.04, "significant": False, "detectable": 0.0412,
            "proportion": True}
    metrics = {"arms": {"base": {"tasks": {"boolq": {"metric": "acc", "n": 300, "score": 0.6}}},
                        "full": {"tasks": {"boolq": {"metric": "acc", "n": 300, "score": 0.61}}}},
               "comparisons": {"full": {"tasks": {"boolq": {"acc": comp}}}}}
    _, header, rows = _score_table(metrics, ["boolq"], "suite")
    assert rows[0][-1] == "+1.0 [-2.0, +4.0], not significant (detects ±4.1)"
    metrics["comparisons"]["full"]["tasks"]["boolq"]["acc"] = {**comp, "ci_low": 0.005, "significant": True}
    assert _score_table(metrics, ["boolq"], "suite")[2][0][-1] == "+1.0 [+0.5, +4.0]"


def test_at_chance_limits_forgetting_and_at_ceiling_limits_learning():
    """A suite task at chance cannot show forgetting; an in-domain task at chance is where learning
    starts (no label), and one the base already scores 100% on cannot show learning."""
    from harness import report

    comp = {"delta": 0.0, "ci_low": 0.0, "ci_high": 0.0, "significant": False, "detectable": 0.1, "proportion": True}
    chance = {"chance": 1 / 3, "score": 0.3, "n": 30, "p_value": 0.6, "above_chance": False}
    tasks = {"boolq": {"metric": "acc", "n": 30, "score": 0.3}, "tweets": {"metric": "acc", "n": 30, "score": 0.3},
             "phrases": {"metric": "acc", "n": 30, "score": 1.0}}
    metrics = {"arms": {"base": {"tasks": tasks}, "full": {"tasks": tasks}},
               "comparisons": {"full": {"tasks": {t: {"acc": comp} for t in tasks}}},
               "measurability": {"boolq": chance, "tweets": chance}}
    entries = [{"task": t, "metric": "acc", "role": role, "leaves": [t]}
               for t, role in (("boolq", "suite"), ("tweets", "in_domain"), ("phrases", "in_domain"))]
    metrics["ceiling"] = report._ceiling(metrics, entries)
    assert metrics["ceiling"] == ["phrases"]
    names = [row[0] for row in report._score_table(metrics, ["boolq"], "suite")[2]]
    assert names == ["boolq — at chance (33%): cannot show forgetting"]
    names = [row[0] for row in report._score_table(metrics, ["tweets", "phrases"], "in_domain")[2]]
    assert names == ["tweets", "phrases — at ceiling (base 100%): cannot show learning"]
    many = {f"a{i}": {"tasks": tasks, "train": None} for i in range(12)}  # arms as rows: the label in the column header
    wide = {**metrics, "arms": {"base": {"tasks": tasks, "train": None}, **many},
            "comparisons": {a: metrics["comparisons"]["full"] for a in many}}
    header = report._score_table(wide, ["tweets", "phrases"], "in_domain")[1]
    assert header[1].startswith("tweets acc") and header[2].startswith("phrases (at ceiling) acc")
    # Lower is better (bits per byte at 1.0): no ceiling.
    entries[2]["metric"] = "bits_per_byte"
    tasks["phrases"]["metric"] = "bits_per_byte"
    metrics["comparisons"]["full"]["tasks"]["phrases"] = {"bits_per_byte": {**comp, "proportion": False}}
    assert report._ceiling(metrics, entries) == []


def test_html_is_the_markdown_rendered_with_plots_embedded(tmp_path):
    from harness.render import to_html, to_markdown

    (tmp_path / "scores.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    blocks = [("h", 2, "Forgetting & drift"), ("p", "arm **full** failed: `OutOfMemoryError` at <unk>"),
              ("table", ["task", "Δ"], [["boolq", "*+1.0*"]]), ("img", "scores.png", "Scores per arm"),
              ("code", "config.json", '{"a": 1}\n')]
    page = to_html(blocks, tmp_path, "Report <t>")
    body = page[page.index("<body>"):]
    assert "<title>Report &lt;t&gt;</title>" in page
    assert '<h2 id="forgetting-drift">Forgetting &amp; drift</h2>' in body
    assert "<p>arm <strong>full</strong> failed: <code>OutOfMemoryError</code> at &lt;unk&gt;</p>" in body
    assert '<div class="table"><table>' in body and "<td><em>+1.0</em></td>" in body
    assert '<figure><img src="data:image/svg+xml;base64,' in body and "<p><figure>" not in body
    assert "<details>\n<summary>config.json</summary>" in body and "&quot;a&quot;: 1" in body
    assert "Forgetting & drift" in to_markdown(blocks)


def test_matched_learning_section_names_the_arms_it_reads():
    from harness.report import _matched

    def comp(learning, forgetting):
        ci = {"significant": True, "ci_low": forgetting - 0.01, "ci_high": forgetting + 0.01}
        return {"learning": {"delta": learning}, "forgetting": {"delta": forgetting, **ci}}

    metrics = {"arms": {"full": {"train": {"method": "full"}}, "qlora": {"train": {"method": "qlora"}},
                        "base-nf4": {"train": None}},
               "comparisons": {"full": comp(0.20, -0.04), "qlora": comp(0.10, -0.01), "base-nf4": comp(0.0, -0.02)}}
    blocks = _matched(metrics)
    assert blocks[0] == ("h", 3, "Forgetting at matched learning") and "+10.0 points" in blocks[1][1]
    rows = {r[0]: r for r in blocks[2][2]}
    assert set(rows) == {"full", "qlora"}  # the 4-bit reference is not a method
    assert rows["full"][1] == "-2.0" and rows["full"][2].startswith("between the base (0, 0) and full (learning +20.0")
    assert rows["qlora"][1] == "-1.0" and rows["qlora"][2].startswith("at qlora (learning +10.0, forgetting -1.0 [")


def test_many_arms_get_short_labels_rows_and_a_digest(run, tmp_path):
    """A sweep's long arm names become <method>-<k> with a legend; with more than four arms the score
    tables put arms in rows (bold where significant) and the summary counts instead of listing."""
    run_dir = tmp_path / "t1"
    shutil.copytree(_run_dir(run), run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    names = []
    for i, lr in enumerate(["1e-4", "5e-4", "1e-3"]):
        name = f"full_learning_rate={lr}_epochs=3"
        names.append(name)
        rec = json.loads((run_dir / "arms/full.json").read_text())
        (run_dir / f"arms/{name}.json").write_text(json.dumps({**rec, "arm": name}))
        shutil.copy(run_dir / "samples/full.csv", run_dir / f"samples/{name}.csv")
        config["arms"][name] = {"method": "full", "overrides": [f"methods.full.learning_rate={lr}", "training.epochs=3"]}
    config["methods"] += names
    (run_dir / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(cli, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    md = (run_dir / "report.md").read_text()
    assert "| full-2 | `full_learning_rate=5e-4_epochs=3` | full | `methods.full.learning_rate=5e-4` `training.epochs=3` |" in md
    general = md.split("## General benchmarks (forgetting)")[1].split("##")[0]
    header = next(line for line in general.splitlines() if line.startswith("| arm |"))
    assert "arc_easy acc, base" in header and "boolq (at chance) acc, base" in header
    rows = [line.split(" | ")[0].strip("| ") for line in general.splitlines() if line.startswith("| ")][2:]
    assert rows == ["base-nf4", "full", "lora", "qlora", "full-1", "full-2", "full-3"]
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["summary"].startswith("6 fine-tuned arms; ")
    assert "full_learning_rate" not in general  # labels, not names, in the wide tables


def test_a_diverged_arm_is_reported_with_its_nan_metrics_named(run, tmp_path):
    """A nan training loss leaves nan bits per byte and KL: the report still renders, names them, and
    computes every finite metric as before."""
    import csv
    import gzip
    import math

    run_dir = tmp_path / "t1"
    shutil.copytree(_run_dir(run), run_dir)
    path = run_dir / "samples/full.csv"
    if not path.exists():
        with gzip.open(path.with_suffix(".csv.gz"), "rt") as fh:
            path.write_text(fh.read())
    rows = list(csv.DictReader(path.open()))
    for r in rows:
        if r["metric"] == "bits_per_byte":
            r["value"] = "nan"
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    rec = json.loads((run_dir / "arms/full.json").read_text())
    for source in rec["kl"].values():
        if isinstance(source, dict):
            for d in source["docs"]:
                d[1] = math.nan
    (run_dir / "arms/full.json").write_text(json.dumps(rec))
    result = CliRunner().invoke(cli, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    md = (run_dir / "report.md").read_text()
    assert "**Diverged** (non-finite per-document values" in md and "full: wikitext bits_per_byte" in md
    assert "| full | non-finite (diverged) | non-finite (diverged) |" in md
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["comparisons"]["full"]["forgetting"] is not None  # the accuracies still count


def test_a_collapsed_perplexity_reads_as_collapsed_not_as_digits():
    from harness.report import _ppl, _rel

    blown = {"base": 32.72, "arm": 1.6558873915944471e13, "delta": 1.6558873915944471e13 - 32.72, "rel_pct": 5e13}
    assert _rel(blown) == "collapsed (5.1e+11x the base)"
    assert _ppl(blown["arm"]) == "1.66e+13"
    assert _rel({"base": 32.72, "arm": 1319.1, "delta": 1286.4, "rel_pct": 3931.5}) == "collapsed (40x the base)"
    assert _rel({"base": 32.72, "arm": 38.11, "delta": 5.39, "rel_pct": 16.5}) == "+5.390 (+16.5%)"
