"""The whole compare pipeline, end to end, on a tiny Llama and hub-schema fixtures."""

from __future__ import annotations

import csv
import json

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from harness.cli import cli


def test_report_files_written(run):
    out, result = run
    run_dir = out / "results" / "finance" / "t1"
    assert result.output.strip().endswith("report.md")
    for name in ("config.json", "metrics.json", "results.csv", "report.md", "scores.png", "scores.svg", "tradeoff.png",
                 "arms/base.json", "arms/full.json", "arms/qlora.json", "samples/base.csv"):
        assert (run_dir / name).stat().st_size > 0, name
    # Weights never land in results/.
    assert not list(run_dir.rglob("*.safetensors"))


def test_scores_in_range_and_paired(run):
    out, _ = run
    m = json.loads((out / "results/finance/t1/metrics.json").read_text())
    assert set(m["arms"]) == {"base", "base-nf4", "full", "lora", "qlora"}
    for arm in m["arms"].values():
        for task, t in arm["tasks"].items():
            assert 0.0 <= t["score"] <= 1.0, task
            assert t["n"] == 8  # the quick profile's limit
    for arm, comp in m["comparisons"].items():
        for task, per_metric in comp["tasks"].items():
            if task == "wikitext":  # the drift measure: bits per byte, paired per page, weighted by bytes
                bpb = per_metric["bits_per_byte"]
                assert bpb["n"] == 2 and bpb["proportion"] is False
                assert bpb["ci_low"] <= bpb["delta"] <= bpb["ci_high"]
                continue
            c = per_metric["acc"]
            assert c["ci_low"] <= c["delta"] <= c["ci_high"]
            assert c["n"] == 8
        # Tasks where the base is not above chance are left out of the forgetting score, and said so.
        measurable = [t for t in ("arc_easy", "boolq") if m["measurability"][t]["above_chance"]]
        assert comp["forgetting"]["tasks"] == measurable
        assert sorted(comp["excluded"]) == sorted({"arc_easy", "boolq"} - set(measurable))
        assert comp["learning"]["tasks"] == ["finance_tweets", "finance_phrasebank"]
        drift = comp["perplexity"]["word_perplexity"]
        assert drift["base"] > 1 and drift["arm"] > 1
    assert m["arms"]["base"]["perplexity"]["n"] == 2  # the quick profile's perplexity_limit
    with open(out / "results/finance/t1/results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["arm"] for r in rows} == {"base", "base-nf4", "full", "lora", "qlora"}
    # QLoRA is also compared with its own 4-bit starting point; other arms are not.
    assert m["comparisons"]["qlora"]["vs_nf4_base"]["forgetting"]["tasks"] == m["comparisons"]["qlora"]["forgetting"]["tasks"]
    assert "vs_nf4_base" not in m["comparisons"]["lora"]
    assert "base-nf4 (training alone)" in (out / "results/finance/t1/report.md").read_text()


def test_trained_arms_differ_from_base(run, tiny_model):
    out, _ = run
    base = load_file(tiny_model / "model.safetensors")
    full = load_file(out / "work/finance/t1/full/model/model.safetensors")
    changed = [k for k in base if k in full and not (base[k].float() == full[k].float()).all()]
    assert changed, "full fine-tuning changed no weight"
    for method in ("lora", "qlora"):
        adapter = load_file(out / f"work/finance/t1/{method}/adapter/adapter_model.safetensors")
        lora_b = [v for k, v in adapter.items() if "lora_B" in k]
        assert lora_b and any(v.abs().sum() > 0 for v in lora_b), f"{method}: lora_B still zero"


def test_qlora_base_is_4bit_and_arms_share_steps(run):
    out, _ = run
    arms = {a: json.loads((out / f"results/finance/t1/arms/{a}.json").read_text()) for a in ("full", "lora", "qlora")}
    assert arms["qlora"]["train"]["base_4bit"] is True
    assert arms["lora"]["train"]["base_4bit"] is False
    assert len({a["train"]["steps"] for a in arms.values()}) == 1  # same steps for every arm
    assert arms["full"]["train"]["trainable_pct"] == pytest.approx(100.0)
    assert 0 < arms["qlora"]["train"]["trainable_params"] == arms["lora"]["train"]["trainable_params"]


def test_rerun_reuses_recorded_arms(run, tiny_model, tiny_task, mirror):
    out, _ = run
    args = ["compare", "--task", str(tiny_task), "--model", str(tiny_model), "--methods", "full,lora,qlora",
            "--profile", "quick", "--mirror", str(mirror), "--run-id", "t1",
            "--results-dir", str(out / "results"), "--work-dir", str(out / "work")]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0
    assert "base: evaluation recorded for these inputs, reused" in result.output
    assert "qlora: training and evaluation recorded for these inputs, reused" in result.output
    config = json.loads((out / "results/finance/t1/config.json").read_text())
    assert config["train_data"]["examples"] == 32  # kept from the first pass: nothing was tokenized again


def test_report_regenerates_identically(run):
    out, _ = run
    run_dir = out / "results/finance/t1"
    names = ("metrics.json", "results.csv", "report.md", "report.html", "scores.svg", "scores.png", "tradeoff.svg",
             "resources.svg", "heatmap.svg")
    before = {n: (run_dir / n).read_bytes() for n in names}
    result = CliRunner().invoke(cli, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert {n: (run_dir / n).read_bytes() for n in before} == before


def test_a_copied_task_file_trains_on_another_dataset(tmp_path, tiny_model, tiny_task, mirror):
    """A new domain is a copied task file pointed at other data: no code changes."""
    import yaml

    task = yaml.safe_load(tiny_task.read_text())
    task["name"] = "phrasebank"
    task["train"] = {"dataset": "takala/financial_phrasebank", "config": "sentences_75agree", "split": "train",
                     "format_task": "finance_phrasebank"}
    task["in_domain"] = [{"task": "finance_phrasebank", "metric": "acc"}]
    path = tmp_path / "phrasebank.yaml"
    path.write_text(yaml.safe_dump(task))
    result = CliRunner().invoke(cli, ["compare", "--task", str(path), "--model", str(tiny_model), "--methods", "full",
                                      "--profile", "quick", "--mirror", str(mirror), "--run-id", "p1",
                                      "--results-dir", str(tmp_path / "r"), "--work-dir", str(tmp_path / "w")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "r/phrasebank/p1/config.json").read_text())
    assert config["train_data"]["dataset"] == "takala/financial_phrasebank"
    assert config["train_data"]["config"] == "sentences_75agree" and config["train_data"]["examples"] == 24
    metrics = json.loads((tmp_path / "r/phrasebank/p1/metrics.json").read_text())
    assert list(metrics["comparisons"]["full"]["learning"]["tasks"]) == ["finance_phrasebank"]


def test_resources_recorded_per_arm(run):
    """Training and evaluation each carry their own figures; saved sizes are the files' sizes."""
    out, _ = run
    for arm in ("base", "base-nf4", "full", "lora", "qlora"):
        rec = json.loads((out / f"results/finance/t1/arms/{arm}.json").read_text())
        er = rec["eval_resources"]
        assert er is not None, arm  # the run fixture's own empty baseline cache: every arm was evaluated
        assert er["seconds"] > 0 and er["peak_rss_bytes"] > 0 and er["model_footprint_bytes"] > 0, arm
        assert er["peak_gpu_allocated_bytes"] is None and er["nvml_source"] is None  # CPU
        assert "start_gpu_allocated_bytes" in er and er["start_gpu_allocated_bytes"] is None  # CPU: no allocator
        t = rec["train"]
        if t is None:
            continue
        assert t["peak_rss_bytes"] > 0 and t["model_footprint_bytes"] > 0 and t["rss_source"]
        assert t["tokens_per_second"] > 0 and t["examples_per_second"] > 0
        files = [out / f"work/finance/t1/{arm}" / ("model" if arm == "full" else "adapter") / f
                 for f in t["saved"]["files"]]
        assert t["saved"]["bytes"] == sum(f.stat().st_size for f in files) > 0
        assert t["saved"]["dtype"] == "float32"
    nf4 = json.loads((out / "results/finance/t1/arms/qlora.json").read_text())["eval_resources"]
    lora = json.loads((out / "results/finance/t1/arms/lora.json").read_text())["eval_resources"]
    assert nf4["model_footprint_bytes"] < lora["model_footprint_bytes"]  # 4-bit base vs the 16-bit one


def test_jobs_at_once_give_the_sequential_results(run, tmp_path, tiny_model, tiny_task, mirror):
    """--jobs 2: references and arms in their own processes, two at a time; every per-document record
    and training loss equals the sequential run's (same seed, same CPU), and the report says how they ran.
    No --run-id: the jobs write into the run the parent named from the clock, not runs of their own."""
    out, _ = run
    args = ["compare", "--task", str(tiny_task), "--model", str(tiny_model), "--methods", "full,qlora",
            "--profile", "quick", "--mirror", str(mirror), "--jobs", "2",
            "--results-dir", str(tmp_path / "results"), "--work-dir", str(tmp_path / "work"), "--device", "cpu",
            "--baselines-dir", str(tmp_path / "baselines")]  # an empty cache: the references are jobs too
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    [par] = (tmp_path / "results/finance").iterdir()  # one run
    seq = out / "results/finance/t1"
    config = json.loads((par / "config.json").read_text())
    assert config["jobs"] == 2 and config["train_data"]["examples"] == 32
    for arm in ("base", "base-nf4", "full", "qlora"):
        assert (par / f"samples/{arm}.csv").read_text() == (seq / f"samples/{arm}.csv").read_text(), arm
        assert (tmp_path / f"work/finance/{par.name}/jobs/{arm}.log").exists()
    for arm in ("full", "qlora"):
        a, b = (json.loads((d / f"arms/{arm}.json").read_text())["train"] for d in (par, seq))
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6) and a["steps"] == b["steps"]
    assert "**Jobs** 2 at once" in (par / "report.md").read_text()
    assert "**Jobs**" not in (seq / "report.md").read_text()


def test_jobs_must_be_a_number_or_auto(tmp_path, tiny_model, tiny_task, mirror):
    args = ["compare", "--task", str(tiny_task), "--model", str(tiny_model), "--profile", "quick",
            "--mirror", str(mirror), "--jobs", "0", "--results-dir", str(tmp_path / "r")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code != 0
    assert result.output.strip().splitlines()[-1] == "Error: --jobs: expected a positive number or auto, got '0'"


def test_auto_jobs_fit_the_gpus_free_memory(monkeypatch):
    """--jobs auto: one on CPU; on a GPU as many as fit in 85% of its free memory (largest first),
    at most one per two cores; a number is taken as given."""
    import torch

    from harness import parallel

    gib = 2**30
    assert parallel.concurrency("auto", needs=[gib] * 4, device="cpu") == 1
    assert parallel.concurrency("3", needs=[gib] * 4, device="cpu") == 3
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (100 * gib, 141 * gib))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(parallel.os, "cpu_count", lambda: 16)
    small = 10 * gib  # a small job (SmolLM2-135M's are ~11 GiB by harness/memory.py, mostly the evaluation's budget)
    assert parallel.concurrency("auto", needs=[small] * 4, device="cuda") == 4
    big = 90 * gib  # over the 85 GiB that 85% of the free 100 GiB offers: it runs alone
    assert parallel.concurrency("auto", needs=[big, small, small], device="cuda") == 1
    assert parallel.concurrency("auto", needs=[small] * 12, device="cuda") == 8  # 16 cores


def test_jobs_are_placed_on_gpus_by_their_memory(monkeypatch):
    """Several GPUs (a fake list of capacities): large arms one per GPU, small jobs packed and spread,
    a job too large for any GPU alone on an empty one, the next job started where one finished."""
    import torch

    from harness import parallel

    gib = 2**30
    sweep = parallel.Placer([68 * gib] * 4, limit=16)
    for i in range(4):  # four 50 GiB arms on four GPUs: all at once, one each
        d = sweep.device_for(50 * gib)
        sweep.take(f"arm{i}", d, 50 * gib)
    assert sorted(d for d, _ in sweep.where.values()) == [0, 1, 2, 3]
    assert sweep.device_for(50 * gib) is None  # a fifth waits
    sweep.release("arm2")
    assert sweep.device_for(50 * gib) == 2

    small = parallel.Placer([68 * gib, 68 * gib], limit=16)
    for i in range(12):
        d = small.device_for(10 * gib)
        if d is None:
            break
        small.take(f"j{i}", d, 10 * gib)
    assert small.count == [6, 6]  # 6 x 10 GiB fit in each 68 GiB, spread evenly
    assert small.device_for(10 * gib) is None

    huge = parallel.Placer([68 * gib, 40 * gib], limit=16)
    assert huge.device_for(100 * gib) == 0  # alone, on the larger empty GPU
    huge.take("big", 0, 100 * gib)
    assert huge.device_for(30 * gib) == 1
    assert huge.device_for(100 * gib) == 1  # another oversized job: alone on the other empty GPU
    huge.take("small", 1, 30 * gib)
    assert huge.device_for(100 * gib) is None  # no GPU is empty: it waits
    assert parallel.Placer([68 * gib] * 2, limit=1).device_for(gib) == 0  # the cap on jobs at once
    no_memory = parallel.Placer(None, limit=4, devices=2)  # --jobs N: the least busy device
    no_memory.take("a", no_memory.device_for(0), 0)
    assert no_memory.device_for(0) == 1

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=0: (80 * gib, 141 * gib))
    monkeypatch.setattr(parallel.os, "cpu_count", lambda: 64)
    big = 54 * gib  # one per 68 GiB GPU
    assert parallel.concurrency("auto", needs=[big] * 3, device="cuda") == 2


def test_each_job_sees_only_its_gpu(monkeypatch, tmp_path):
    from harness import parallel
    from harness.pipeline import Arm, CompareSpec, run_job

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    assert [parallel.visible_device(i) for i in (0, 1)] == ["4", "5"]
    started = {}

    class FakePool:  # stands in for ProcessPoolExecutor: records the environment each job's process gets
        def __init__(self, max_workers, mp_context, initializer, initargs):
            self.env = initargs[0]

        def submit(self, fn, job):
            import concurrent.futures

            started[job.name] = self.env.get("CUDA_VISIBLE_DEVICES")
            done = concurrent.futures.Future()
            done.set_result(job.name)
            return done

        def shutdown(self, **kw):
            pass

    import concurrent.futures

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", FakePool)
    gib = 2**30
    placer = parallel.Placer([68 * gib, 68 * gib], limit=4)
    arms = [Arm("full", "full"), Arm("qlora", "qlora")]
    jobs = parallel.Jobs(CompareSpec(task="finance", model="m"), arms, ["full", "qlora", "base"], 4,
                         tmp_path / "jobs", lambda msg: None, runner=run_job, needs={"full": 50 * gib, "qlora": 50 * gib,
                                                                     "base": 10 * gib}, placer=placer)
    jobs.start().wait()
    assert started["full"] != started["qlora"] and {started["full"], started["qlora"]} == {"4", "5"}
    assert started["base"] in ("4", "5") and placer.count == [0, 0]


def test_a_jobs_error_comes_back_as_an_object(tmp_path):
    """A real child process (spawn) whose job stops with a HarnessError: the parent names the job and
    the error's own line, not text scraped from its output; the job's log holds what it printed."""
    from harness import parallel
    from harness.pipeline import Arm, CompareSpec, run_job

    spec = CompareSpec(task="no-such-task", model="m", results_dir=tmp_path / "r", work_dir=tmp_path / "w")
    lines = []
    jobs = parallel.Jobs(spec, [Arm("full", "full")], ["full"], 1, tmp_path / "jobs", lines.append, runner=run_job)
    with pytest.raises(parallel.HarnessError) as e:
        jobs.start().wait()
    assert str(e.value).startswith("jobs failed: full (unknown task 'no-such-task'")
    assert "job full: FAILED" in lines[-1]
    assert (tmp_path / "jobs" / "full.log").exists()


def _import_graph() -> dict[str, set[str]]:
    """Every `harness.*` import of every module, lazy ones inside functions included."""
    import ast

    from harness.config import PROJECT_ROOT

    files = {p.stem: p for p in (PROJECT_ROOT / "harness").glob("*.py")}
    graph = {}
    for name, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "harness":
                deps |= {a.name for a in node.names if a.name in files}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("harness."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("harness.")}
        graph[name] = deps - {name}
    return graph


def test_the_harness_import_graph_has_no_cycle_and_no_upward_arrow():
    """No module reaches itself; none imports from a higher layer (harness.LAYERS); every module has a layer."""
    import harness

    graph = _import_graph()

    def reaches(start, goal, seen):
        return any(d == goal or (d not in seen and reaches(d, goal, seen | {d})) for d in graph.get(start, ()))

    assert not [m for m in graph if reaches(m, m, {m})]
    level = {m: i for i, mods in enumerate(harness.LAYERS.values()) for m in mods}
    assert set(graph) - {"__init__"} == set(level), "a module without a layer, or a layer naming no module"
    upward = [f"{m} -> {d}" for m, deps in graph.items() for d in deps if m in level and level[d] > level[m]]
    assert not upward
    assert "parallel" in graph["pipeline"] and "pipeline" not in graph["parallel"]
    assert not graph["records"] & {"models", "evaluate", "train"}  # reading a report needs no backend


def test_an_out_of_memory_retry_starts_without_the_failed_attempt(tmp_path, tiny_task, monkeypatch):
    """An arm that runs out of memory is retried at half the micro-batch, and the retry must not start
    while the failed attempt's model, gradients and optimizer state are still referenced (by the
    exception's traceback): at 8B that is the memory the retry needs. Its record names the retry."""
    import gc
    import weakref
    from types import SimpleNamespace

    from harness import arms, train
    from harness.config import load_task
    from harness.pipeline import Arm

    class Weights:  # stands in for what a training attempt holds on the GPU
        pass

    attempts = []

    def fake_run(method, *, task, **kw):
        held = Weights()
        attempts.append((task.methods[method].micro_batch_size, weakref.ref(held)))
        if len(attempts) == 1:
            raise MemoryError("CUDA out of memory. Tried to allocate 29.73 GiB")
        gc.collect()
        assert attempts[0][1]() is None, "the failed attempt's memory is still held at the retry"
        stats = {"steps": 1, "seconds": 1.0, "train_loss": 1.0, "trainable_params": 1, "trainable_pct": 100.0}
        return train.TrainResult(model=held, stats=stats)

    monkeypatch.setattr(train, "run", fake_run)
    task = load_task(str(tiny_task))
    run = SimpleNamespace(plan=SimpleNamespace(arm_tasks={"full": task}, profile=task.profiles["quick"]),
                          resolved=SimpleNamespace(path="unused"))
    (tmp_path / "full").mkdir()
    model, stats = arms._train(run, Arm("full", "full"), [], tmp_path / "full", "inputs")
    assert [m for m, _ in attempts] == [4, 2]
    assert stats["oom_retry"] == {"error": "CUDA out of memory. Tried to allocate 29.73 GiB",
                                  "micro_batch_size_from": 4, "micro_batch_size_to": 2}
