"""An arm over several devices (harness/distributed.py): two processes over gloo on CPU, as CI has no
GPU, against the same arm trained in one process: same steps, losses and weights, for DDP (full
fine-tuning and LoRA) and FSDP (full fine-tuning, weights gathered from the shards to save)."""

from __future__ import annotations

import pytest
import torch

from conftest import ON_CPU
from harness import context, distributed, evaluate, models, train
from harness.config import HarnessError, load_task

# The ranks run on CPU (gloo), so the one-process reference does too (ON_CPU), on a GPU machine as well.

# The tiny task's quick profile: 4 optimizer steps at batch 8, micro-batch 2 (4 micro-steps a step in one
# process, 2 in each of two).
COMMON = ["lora.lora_dropout=0.0", "methods.full.micro_batch_size=2", "methods.lora.micro_batch_size=2",
          "training.logging_steps=1"]


def _examples(task, tiny_model, mirror):
    profile = task.profiles["quick"]
    tok = models.load_tokenizer(str(tiny_model))
    examples, _ = train.training_examples(task, profile, tok, mirror=mirror)
    return profile, examples


@pytest.mark.slow  # two spawned ranks, each importing torch and transformers
@pytest.mark.parametrize("method,mode", [("full", "ddp"), ("lora", "ddp"), ("full", "fsdp")])
def test_two_processes_train_as_one_process(tmp_path, tiny_model, tiny_task, mirror, method, mode):
    one_task = load_task(str(tiny_task), COMMON)
    profile, examples = _examples(one_task, tiny_model, mirror)
    with context.use(ON_CPU):
        one = train.run(method, task=one_task, profile=profile, model_path=str(tiny_model), examples=examples,
                        out_dir=tmp_path / "one")
    ddp_task = load_task(str(tiny_task), [*COMMON, f"training.distributed={mode}", "training.processes=2"])
    stats = distributed.train(method, task=ddp_task, profile=profile, model_path=str(tiny_model), examples=examples,
                              out_dir=tmp_path / "ddp", device="cpu", log=lambda m: None)
    assert stats["distributed"] == {"mode": mode, "processes": 2}
    assert stats["steps"] == one.stats["steps"] == 4 and stats["batch_size"] == one.stats["batch_size"]
    # Each step's loss is the mean over the same examples (all ranks' tokens), reduced in another order.
    assert [h["loss"] for h in stats["loss_history"]] == pytest.approx(
        [h["loss"] for h in one.stats["loss_history"]], rel=1e-4)
    with context.use(ON_CPU):
        ddp = models.load_arm(method, str(tiny_model), tmp_path / "ddp" / ("model" if method == "full" else "adapter"),
                              quant={})
        base = models.load_base(str(tiny_model)).state_dict()
    a, b = one.model.state_dict(), ddp.state_dict()
    keys = [k for k in a if (method == "full" or "lora_" in k)]
    assert keys and set(keys) <= set(b)
    for k in keys:  # fp32 sums in another order (FSDP: sharded, gathered whole to save); rounding level
        torch.testing.assert_close(b[k].float(), a[k].float(), rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    # ...and the weights did train (a rank that skipped its share would still load the base's).
    trained = [k for k in keys if k.replace("base_model.model.", "") in base]
    assert method != "full" or any(not torch.equal(b[k], base[k]) for k in trained)


def test_bad_distributed_settings_are_one_line(tiny_task):
    with pytest.raises(HarnessError, match="training.processes: at least 2 for training.distributed, got 1"):
        load_task(str(tiny_task), ["training.distributed=ddp", "training.processes=1"])
    with pytest.raises(HarnessError, match=r"distributed: 'dp' is not one of \('none', 'ddp', 'fsdp'\)"):
        load_task(str(tiny_task), ["training.distributed=dp"])
    task = load_task(str(tiny_task), ["training.distributed=ddp"])
    with pytest.raises(HarnessError, match="on CPU, give training.processes"):
        distributed.processes(task, "cpu")


def test_more_processes_than_gpus_is_refused(tiny_task, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    task = load_task(str(tiny_task), ["training.distributed=fsdp", "training.processes=4"])
    with pytest.raises(HarnessError, match=r"training.processes=4: more processes than devices \(2 GPUs visible\)"):
        distributed.processes(task, "cuda")
    assert distributed.processes(load_task(str(tiny_task), ["training.distributed=ddp"]), "cuda") == 2


def test_ranks_on_cpu_see_no_gpu_whatever_the_callers_context(tmp_path, monkeypatch):
    """A launch on CPU from a context that would take a GPU (--device auto on a GPU machine): the ranks
    get a CPU context and no visible GPU; else rank 1 of two loads onto cuda:1, absent on one GPU."""
    import pickle
    import subprocess

    seen = {}

    def fake_run(cmd, env):
        job = pickle.loads((tmp_path / "evaluate.job.pkl").read_bytes())
        seen.update(cmd=cmd, visible=env.get("CUDA_VISIBLE_DEVICES"), device=job["context"].device)
        (tmp_path / "evaluate.out.pkl").write_bytes(pickle.dumps({"n": {}}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(distributed.subprocess, "run", fake_run)
    with context.use(context.RunContext(device="auto")):
        assert distributed.evaluate({"path": "m"}, [], n=2, device="cpu", work=tmp_path) == {"n": {}}
    assert seen["device"] == "cpu" and seen["visible"] == ""
    assert "torch.distributed.run" in seen["cmd"]


@pytest.mark.slow
def test_a_compare_trains_an_arm_over_two_processes_and_evaluates_it(tmp_path, tiny_model, tiny_task, mirror):
    """Through the pipeline: the arm's job launches the ranks, then loads the saved adapter and evaluates it."""
    import json

    from click.testing import CliRunner

    from harness.cli import cli

    args = ["compare", "--task", str(tiny_task), "--model", str(tiny_model), "--methods", "lora", "--profile", "quick",
            "--mirror", str(mirror), "--run-id", "ddp", "--results-dir", str(tmp_path / "r"), "--work-dir",
            str(tmp_path / "w"), "--jobs", "1", "--device", "cpu",  # gloo ranks, on a GPU machine too
            *COMMON, "training.distributed=ddp", "training.processes=2"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    arm = json.loads((tmp_path / "r" / "finance" / "ddp" / "arms" / "lora.json").read_text())
    assert arm["train"]["distributed"] == {"mode": "ddp", "processes": 2} and arm["train"]["steps"] == 4
    assert arm["results"] and arm["n"]
    assert "| lora |" in (tmp_path / "r" / "finance" / "ddp" / "report.md").read_text()


@pytest.mark.slow
def test_data_parallel_evaluation_gives_the_one_process_documents(tmp_path, tiny_model, mirror):
    """lm-eval's own data-parallel path over two processes: each rank scores every other document,
    rank 0 gathers them; the per-document records and the aggregates are those of one process."""
    runs = [evaluate.TaskRun("arc_easy", limit=12), evaluate.TaskRun("boolq", limit=12)]
    kw = dict(mirror=mirror, batch_size=4, seed=0)
    with context.use(ON_CPU):
        one = evaluate.evaluate(models.load_base(str(tiny_model)), models.load_tokenizer(str(tiny_model)), runs, **kw)
    two = distributed.evaluate({"path": str(tiny_model)}, runs, n=2, device="cpu", work=tmp_path, **kw)
    assert two["processes"] == 2 and "processes" not in one  # lm-eval sharded the documents over both ranks
    assert two["n"] == one["n"] == {"arc_easy": 12, "boolq": 12}
    for task in ("arc_easy", "boolq"):
        by_doc = {r["doc_id"]: r for r in two["samples"][task]}
        assert sorted(by_doc) == sorted(r["doc_id"] for r in one["samples"][task])
        for rec in one["samples"][task]:
            got = by_doc[rec["doc_id"]]
            assert got.keys() == rec.keys()
            for k, v in rec.items():  # the same choice, the same metric values (float sums: to rounding)
                assert got[k] == (pytest.approx(v, rel=1e-5) if isinstance(v, float) else v), (task, rec["doc_id"], k)
        assert two["results"][task]["acc"] == pytest.approx(one["results"][task]["acc"])


@pytest.mark.slow
def test_a_compare_evaluated_over_two_processes_records_the_same_documents(run, tmp_path, tiny_model, tiny_task,
                                                                           mirror):
    """profiles.*.eval_processes=2: the base and a trained arm are each scored by two ranks (each loads
    the model: the base, or the saved adapter); their per-document records are the one-process run's."""
    from click.testing import CliRunner

    from harness.cli import cli
    from harness.io import read_samples

    args = ["compare", "--task", str(tiny_task), "--model", str(tiny_model), "--methods", "lora", "--profile", "quick",
            "--mirror", str(mirror), "--run-id", "dp", "--results-dir", str(tmp_path / "r"), "--work-dir",
            str(tmp_path / "w"), "--refresh-baseline", "--device", "cpu", "profiles.quick.eval_processes=2"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "w" / "finance" / "dp" / "eval" / "base" / "evaluate.out.pkl").exists()  # (the ranks' result)
    assert (tmp_path / "w" / "finance" / "dp" / "eval" / "lora" / "evaluate.out.pkl").exists()
    for arm in ("base", "lora"):
        mine = read_samples(tmp_path / "r" / "finance" / "dp" / "samples" / f"{arm}.csv")
        theirs = read_samples(run[0] / "results" / "finance" / "t1" / "samples" / f"{arm}.csv")
        assert mine.keys() == theirs.keys()
        for task in theirs:
            a = sorted(theirs[task], key=lambda r: (r["doc_id"], str(r)))
            b = sorted(mine[task], key=lambda r: (r["doc_id"], str(r)))
            assert len(a) == len(b)
            for x, y in zip(a, b):
                assert x.keys() == y.keys() and all(
                    y[k] == (pytest.approx(v, rel=1e-5) if isinstance(v, float) else v) for k, v in x.items()), (arm, task)


def test_jobs_that_span_devices_run_one_at_a_time(monkeypatch, tmp_path, tiny_model, tiny_task, mirror):
    """--jobs places each job on one GPU; a job that launches over every GPU must see them all, so a run
    with such a job runs its jobs one after the other."""
    from harness import parallel, pipeline
    from harness.planning import Arm, CompareSpec, prepare

    started, done = [], []
    monkeypatch.setattr(parallel, "concurrency", lambda *a, **k: 2)
    monkeypatch.setattr(parallel.Jobs, "start", lambda self: started.append(self.queue) or self)
    monkeypatch.setattr(pipeline, "execute", lambda run, name: done.append(name))
    spec = CompareSpec(task=str(tiny_task), model=str(tiny_model), methods=("full", "lora"), profile="quick",
                       mirror=str(mirror), run_id="span", results_dir=tmp_path / "r", work_dir=tmp_path / "w",
                       jobs="2", overrides=("training.distributed=ddp", "training.processes=2"))
    arms = [Arm("full", "full"), Arm("lora", "lora")]
    with context.use(ON_CPU):  # two gloo ranks: on a one-GPU machine, two CUDA ranks are refused in planning
        run = prepare(spec, arms)
        assert pipeline.spans_devices(run)
        pipeline._run_jobs(run, ["base", "full", "lora"])
        assert started == [] and done == ["base", "full", "lora"]
        plain = prepare(CompareSpec(**{**spec.__dict__, "overrides": ()}), arms)
        assert not pipeline.spans_devices(plain)
