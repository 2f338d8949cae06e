"""Bad input, table-driven: each mistake gives one error line naming the file, field or value, exit
code 2, no traceback, and nothing recorded as done. Every case stops before a weight is loaded."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from harness.cli import cli

Env = namedtuple("Env", "tmp task model mirror")


def _task_file(env: Env, edit) -> str:
    data = yaml.safe_load(env.task.read_text())
    edit(data)
    path = env.tmp / "task.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def _mirror_with(env: Env, rows: list[dict] | None = None, drop: str | None = None, splits=("train",)) -> str:
    """A copy of the fixture mirror with other rows in the tweets' splits, or without one dataset."""
    copy = env.tmp / "mirror"
    shutil.copytree(env.mirror, copy)
    if drop:
        shutil.rmtree(copy / drop)
    for split in splits if rows is not None else ():
        path = copy / f"zeroshot/twitter-financial-news-sentiment/default/{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(copy)


def _model_with(env: Env, config_edit=None, truncate=False, pickle=False) -> str:
    copy = env.tmp / "model"
    shutil.copytree(env.model, copy)
    if config_edit:
        cfg = json.loads((copy / "config.json").read_text())
        config_edit(cfg)
        (copy / "config.json").write_text(json.dumps(cfg))
    weights = copy / "model.safetensors"
    if truncate:
        weights.write_bytes(weights.read_bytes()[:-100])
    if pickle:
        weights.rename(copy / "pytorch_model.bin")
    return str(copy)


def _corrupt_saved(env: Env, arm: str, relative: str, extra: dict | None = None) -> list[str]:
    """A leftover of an earlier attempt in the work dir with a truncated safetensors file."""
    d = env.tmp / "w" / "finance" / "rid" / arm
    target = d / relative
    target.parent.mkdir(parents=True)
    target.write_bytes((env.model / "model.safetensors").read_bytes()[:300])
    for name, data in (extra or {}).items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(json.dumps(data))
    return ["--run-id", "rid"]


def _disk_full(monkeypatch):
    usage = shutil.disk_usage("/")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10_000))


def _not_writable(env: Env) -> list[str]:
    blocker = env.tmp / "a-file"
    blocker.write_text("")
    return ["--results-dir", str(blocker / "results")]


# (id, builder(env) -> extra CLI args, expected words in the one error line)
CASES = [
    ("yaml-syntax", lambda e: ["--task", str(_write(e.tmp / "broken.yaml", "name: finance\ntraining: [1, 2\n"))],
     ["broken.yaml", "YAML syntax error"]),
    ("unknown-key-suggests", lambda e: ["--task", _task_file(e, lambda d: d.update(trainig=d.pop("training")))],
     ["task.yaml", "unknown key 'trainig'", "did you mean 'training'"]),
    ("unknown-nested-key", lambda e: ["training.learning_rate=1e-5"],
     ["training: unknown key 'learning_rate'"]),
    ("override-without-value", lambda e: ["training.epochs"], ["override 'training.epochs'", "key.path=value"]),
    ("wrong-type", lambda e: ["training.epochs=many"], ["training: epochs: expected float, got 'many'"]),
    ("missing-required-key", lambda e: ["--task", _task_file(e, lambda d: d.pop("train"))],
     ["missing required key 'train'"]),
    ("unknown-task", lambda e: ["--task", "nope"], ["unknown task 'nope'", "available: finance"]),
    ("unknown-suite", lambda e: ["--task", _task_file(e, lambda d: d.update(suite="nosuch"))],
     ["unknown suite 'nosuch'"]),
    ("unknown-lm-eval-task", lambda e: ["--task", _task_file(e, lambda d: d["in_domain"].append({"task": "finance_tweetz"}))],
     ["unknown lm-eval task 'finance_tweetz'", "did you mean"]),
    ("unknown-method", lambda e: ["--methods", "full,adapter"], ["unknown method 'adapter'", "valid: full, lora, qlora"]),
    ("method-without-settings", lambda e: ["--task", _task_file(e, lambda d: d["methods"].pop("lora")),
                                           "--methods", "lora"], ["'lora' has no settings under methods: in /", "/task.yaml"]),
    ("train-on-a-scored-split", lambda e: ["--task", _task_file(e, lambda d: d["train"].update(split="validation"))],
     ["train: zeroshot/twitter-financial-news-sentiment (default/validation) is the split that evaluated task "
      "finance_tweets scores"]),
    ("unknown-model", lambda e: ["--model", "not-a-model"], ["--model not-a-model: not a local directory"]),
    ("model-dir-without-config", lambda e: ["--model", str(e.tmp)], ["has no config.json"]),
    ("mirror-missing", lambda e: ["--mirror", "/does/not/exist"], ["mirror directory /does/not/exist does not exist"]),
    ("mirror-lacks-training-data", lambda e: ["--mirror", _mirror_with(e, drop="zeroshot")],
     ["zeroshot/twitter-financial-news-sentiment", "not in the mirror", "train.jsonl"]),
    ("mirror-lacks-benchmark", lambda e: ["--mirror", _mirror_with(e, drop="allenai")],
     ["task arc_easy", "allenai/ai2_arc", "not in the mirror"]),
    ("split-missing", lambda e: ["train.split=nosplit"], ["(default/nosplit): not in the mirror", "nosplit.jsonl"]),
    ("field-missing", lambda e: ["--mirror", _mirror_with(e, rows=[{"tweet": "up", "label": 0}] * 4,
                                                                 splits=("train", "validation"))],
     ["dataset zeroshot/twitter-financial-news-sentiment", "task finance_tweets", "'text' is undefined"]),
    ("empty-dataset", lambda e: ["--mirror", _mirror_with(e, rows=[])], ["(default/train): the split is empty", "train.jsonl has no rows"]),
    ("not-json-lines", lambda e: ["--mirror", _garbled(e)],
     ["train.jsonl: not readable as JSON lines"]),
    ("field-missing-in-train-only", lambda e: ["--mirror", _mirror_with(e, rows=[{"tweet": "up", "label": 0}] * 4)],
     ["(default/train): task finance_tweets", "Couldn't cast", "tweet: string"]),
    ("label-outside-choices", lambda e: ["--mirror", _mirror_with(e, rows=[{"text": "up", "label": 0},
                                                                         {"text": "down", "label": 7}])],
     ["row 1", "label 7 is outside the choices"]),
    ("learning-rate-zero", lambda e: ["methods.full.learning_rate=0"], ["full: learning_rate: must be > 0, got 0.0"]),
    ("learning-rate-negative", lambda e: ["methods.full.learning_rate=-1e-5"], ["learning_rate: must be > 0"]),
    ("rank-zero", lambda e: ["lora.r=0"], ["lora.r: must be a positive integer, got 0"]),
    ("batch-size-zero", lambda e: ["training.batch_size=0"], ["training.batch_size: must be > 0, got 0"]),
    ("micro-batch-zero", lambda e: ["methods.full.micro_batch_size=0"], ["micro_batch_size: must be > 0"]),
    ("epochs-negative", lambda e: ["training.epochs=-1"], ["training.epochs: must be > 0"]),
    ("steps-zero", lambda e: ["profiles.quick.max_steps=0"], ["max_steps: must be a positive number or null, got 0"]),
    ("save-steps-zero", lambda e: ["training.save_steps=0"], ["training.save_steps: must be > 0"]),
    ("negative-limit", lambda e: ["profiles.quick.limit=-5"], ["limit: must be a positive number or null, got -5"]),
    ("run-id-traversal", lambda e: ["--run-id", "../escape"], ["--run-id '../escape'"]),
    ("results-not-writable", _not_writable, ["a-file/results", "not writable"]),
    ("gpu-where-none", "no-gpu", ["--device cuda: no CUDA GPU is available"]),
    # The distributed cases on CPU (gloo), also where the machine has a GPU.
    ("distributed-on-cpu-without-processes", lambda e: ["--device", "cpu", "training.distributed=ddp"],
     ["training.distributed=ddp: on CPU, give training.processes"]),
    ("distributed-unknown-mode", lambda e: ["training.distributed=deepspeed"],
     ["distributed: 'deepspeed' is not one of ('none', 'ddp', 'fsdp')"]),
    ("fsdp-with-snapshots", lambda e: ["--device", "cpu", "training.distributed=fsdp", "training.processes=2",
                                       "training.eval_at=[0.5]"],
     ["training.eval_at: snapshots of FSDP-sharded weights are not saved"]),
    ("fsdp-qlora-uint8-storage", lambda e: ["--device", "cpu", "training.distributed=fsdp", "training.processes=2",
                                            "--methods", "qlora"],
     ["fsdp with qlora: set quant.bnb_4bit_quant_storage=bfloat16"]),
    ("micro-batch-times-processes", lambda e: ["--device", "cpu", "training.distributed=ddp", "training.processes=3",
                                               "methods.full.micro_batch_size=2", "--methods", "full"],
     ["micro_batch_size=2 x 3 processes must divide the effective batch"]),
    ("remote-code-without-flag", lambda e: ["--model", _model_with(e, lambda c: c.update(
        auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"}))],
     ["config.json", "auto_map", "--trust-remote-code"]),
    ("pickle-weights", lambda e: ["--model", _model_with(e, pickle=True)], ["pytorch_model.bin", "--allow-pickle"]),
    ("corrupt-model-weights", lambda e: ["--model", _model_with(e, truncate=True)],
     ["model.safetensors: corrupt or truncated safetensors"]),
    ("corrupt-adapter", lambda e: _corrupt_saved(e, "lora", "adapter/adapter_model.safetensors",
                                                 {"train.json": {"inputs": "x", "stats": {}}}) + ["--methods", "lora"],
     ["lora/adapter/adapter_model.safetensors: corrupt or truncated"]),
    ("corrupt-checkpoint", lambda e: _corrupt_saved(e, "full", "trainer/checkpoint-2/model.safetensors",
                                                    {"trainer/checkpoint-2/trainer_state.json": {"global_step": 2}}),
     ["checkpoint-2/model.safetensors: corrupt or truncated"]),
    ("disk-too-small", "disk", ["work directory", "needed for the checkpoints of full", "only 0.0 GB (10000 bytes) free"]),
    ("resume-not-a-run", lambda e: ["--resume", str(e.tmp)], ["--resume", "no config.json there"]),
    ("unknown-filter", lambda e: _suite(e, [{"task": "arc_easy", "metric": "acc,strict-match"}]),
     ["task arc_easy has no filter 'strict-match'", "its filters: none"]),
    ("unknown-metric", lambda e: _suite(e, [{"task": "arc_easy", "metric": "exact_match"}]),
     ["task arc_easy logs no metric 'exact_match'", "acc, acc_norm"]),
    ("negative-fewshot", lambda e: _suite(e, [{"task": "arc_easy", "metric": "acc", "num_fewshot": -1}]),
     ["arc_easy: num_fewshot must be >= 0, got -1"]),
    ("suite-option-unknown", lambda e: ["--suite", "nosuch"], ["unknown suite 'nosuch'"]),
    ("ifeval-without-nltk-data", "nltk", ["task ifeval", "punkt_tab", "set NLTK_DATA"]),
    # Keys handed to peft / transformers, checked against them before a weight loads.
    ("quant-key-typo", lambda e: ["quant.bnb_4bit_quant_typ=nf4", "--methods", "qlora"],
     ["quant.bnb_4bit_quant_typ: not an argument of transformers.BitsAndBytesConfig", "did you mean bnb_4bit_quant_type?"]),
    ("quant-compute-dtype", lambda e: ["quant.bnb_4bit_compute_dtype=bfloat61", "--methods", "qlora"],
     ["quant.bnb_4bit_compute_dtype: 'bfloat61' is not a torch dtype"]),
    ("quant-type-value", lambda e: ["quant.bnb_4bit_quant_type=nf5", "--methods", "qlora"], ["quant.bnb_4bit_quant_type: 'nf5'", "nf4, fp4"]),
    ("lora-key-typo", lambda e: ["lora.lora_alhpa=32", "--methods", "lora"],
     ["lora.lora_alhpa: not an argument of peft.LoraConfig", "did you mean lora_alpha?"]),
    ("lora-target-missing", lambda e: ["lora.target_modules=[q_proj, nonexistent_proj]", "--methods", "lora"],
     ["lora.target_modules: 'nonexistent_proj' matches no module of the model", "q_proj", "up_proj"]),
    ("lora-target-pattern", lambda e: ["lora.target_modules=.*attn_out.*", "--methods", "qlora"],
     ["lora.target_modules: the pattern '.*attn_out.*' matches no module"]),
    ("freeze-every-layer", lambda e: ["mitigation.freeze_layers=2"],
     ["mitigation.freeze_layers: 2 would freeze every one of the model's 2 decoder layers"]),
    ("l2-for-adapters", lambda e: ["mitigation.l2_to_base=0.1", "--methods", "qlora"],
     ["mitigation.l2_to_base: pulls full fine-tuning's weights toward the base; method qlora"]),
    ("eval-at-outside", lambda e: ["training.eval_at=[0.5, 1.5]"],
     ["training.eval_at: each entry a fraction of the steps in (0, 1], got 1.5"]),
    ("interpolate-outside", lambda e: ["mitigation.interpolate=[-0.5]"], ["mitigation.interpolate: each alpha in [0, 1], got -0.5"]),
    ("interpolate-dora", lambda e: ["mitigation.interpolate=[0.5]", "lora.use_dora=true", "--methods", "lora"],
     ["mitigation.interpolate: scales the adapter's update, which lora.use_dora makes non-linear"]),
    ("scheduler-unknown", lambda e: ["training.lr_scheduler=bogus"],
     ["training.lr_scheduler: 'bogus' is not a transformers scheduler", "cosine"]),
    ("optim-unknown", lambda e: ["training.optim=adamw_bnb_8bits"],
     ["training.optim: 'adamw_bnb_8bits' is not a transformers optimizer (OptimizerNames); did you mean adamw_bnb_8bit?"]),
]


def _suite(env: Env, tasks: list[dict]) -> list[str]:
    path = env.tmp / "suite.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "tasks": tasks}))
    return ["--suite", str(path)]


def _garbled(env: Env) -> str:
    copy = _mirror_with(env)
    (Path(copy) / "zeroshot/twitter-financial-news-sentiment/default/train.jsonl").write_text('{"text": "up", "lab\n')
    return copy


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("case, build, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, build, expected, tmp_path, tiny_model, tiny_task, mirror, monkeypatch):
    env = Env(tmp_path, tiny_task, tiny_model, mirror)
    if build == "disk":
        _disk_full(monkeypatch)
        extra = []
    elif build == "no-gpu":  # --device cuda where torch finds none (as on a CPU machine, on a GPU one too)
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        extra = ["--device", "cuda"]
    elif build == "nltk":  # IFEval's data lookup: an empty NLTK path, as on a machine without the data
        import nltk

        monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "no-nltk-data")])
        monkeypatch.setenv("NLTK_DATA", str(tmp_path / "no-nltk-data"))
        extra = ["--suite", "instruct"]
    else:
        extra = build(env)
    args = ["compare", "--task", str(tiny_task), "--model", str(tiny_model), "--mirror", str(mirror),
            "--methods", "full", "--profile", "quick", "--results-dir", str(tmp_path / "r"),
            "--work-dir", str(tmp_path / "w")]
    if case == "resume-not-a-run":
        args = ["compare"]
    result = CliRunner().invoke(cli, args + extra)
    lines = [ln for ln in result.output.splitlines() if ln.startswith(("Error", "Usage", "Try"))]
    error = next((ln for ln in lines if ln.startswith("Error")), "")
    print(f"{case}: {error}")  # the table of inputs and error lines, for the record
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    for words in expected:
        assert words in error, f"{words!r} not in {error!r}"
    # Nothing recorded as done: no config, arm record, report or trained weights; not even an
    # empty run folder, which `ls results/finance` would show as a run.
    assert not list((tmp_path / "r").rglob("*"))
    assert not list((tmp_path / "w").rglob("train.json")) or case.startswith("corrupt")


def test_report_of_a_truncated_record_names_the_file(tmp_path):
    run_dir = tmp_path / "finance" / "rid"
    (run_dir / "arms").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({
        "run_id": "rid", "methods": [], "suite": {"name": "s", "tasks": [{"task": "arc_easy", "metric": "acc"}]},
        "task": {"name": "finance", "in_domain": [], "training": {"seed": 0}},
        "profile": {"name": "quick"}, "model": {"name": "m"}, "environment": {}}))
    (run_dir / "arms" / "base.json").write_text('{"arm": "base", "results": {"arc_e')
    result = CliRunner().invoke(cli, ["report", str(run_dir)])
    assert result.exit_code == 2, result.output
    assert f"{run_dir}/arms/base.json: corrupt or truncated JSON" in result.output
    assert "Traceback" not in result.output
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "report.md").exists()


def _recorded_run(tmp_path, spec_extra: dict) -> Path:
    run_dir = tmp_path / "results" / "finance" / "rid"
    run_dir.mkdir(parents=True)
    spec = {"task": "finance", "model": "m", "methods": ["full"], "profile": "quick", "mirror": None, "overrides": [],
            "device": "cpu", "trust_remote_code": False, "allow_pickle": False, "include_path": [],
            "work_dir": str(tmp_path / "w"), "suites": []} | spec_extra
    (run_dir / "config.json").write_text(json.dumps({
        "spec": spec, "arms": {"full": {"method": "full", "overrides": []}}, "run_id": "rid", "methods": ["full"],
        "task": {"name": "finance", "in_domain": []}, "suite": {"name": "s", "tasks": []}, "profile": {"name": "quick"},
        "model": {"name": "m"}, "environment": {}, "schema_version": 2, "evaluation": {"entries": []}}))
    return run_dir


def test_resume_takes_code_running_permissions_from_the_command_line_only(tmp_path, monkeypatch):
    """A config.json that grants remote code, pickles and a task-hook directory grants nothing on --resume."""
    import harness.pipeline

    seen = []
    monkeypatch.setattr(harness.pipeline, "compare", lambda spec, arms: seen.append(spec) or tmp_path)
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    run_dir = _recorded_run(tmp_path, {"trust_remote_code": True, "allow_pickle": True, "include_path": [str(hooks)]})
    result = CliRunner().invoke(cli, ["compare", "--resume", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert (seen[0].trust_remote_code, seen[0].allow_pickle, seen[0].include_path) == (False, False, ())
    assert seen[0].task == "finance" and seen[0].run_id == "rid"  # the rest is the recorded run
    result = CliRunner().invoke(cli, ["compare", "--resume", str(run_dir), "--trust-remote-code",
                                      "--include-path", str(hooks)])
    assert result.exit_code == 0, result.output
    assert (seen[1].trust_remote_code, seen[1].allow_pickle, seen[1].include_path) == (True, False, (str(hooks),))


def test_resume_of_a_config_with_unknown_settings_is_one_line(tmp_path):
    run_dir = _recorded_run(tmp_path, {"turbo": True})
    result = CliRunner().invoke(cli, ["compare", "--resume", str(run_dir)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "config.json: spec records unknown settings turbo" in result.output


def test_the_disk_check_counts_checkpoints_only_for_arms_that_save_them(tmp_path, monkeypatch):
    """8B full fine-tuning: the fp32 model (32 GB) fits a 64 GB disk, its two resumable checkpoints
    (~190 GB) do not; with training.save_minutes=0 the arm writes none, and is not refused for them."""
    from harness import planning
    from harness.config import HarnessError

    n = 8_000_000_000
    usage = shutil.disk_usage("/")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=64 * 10**9))
    arms = [planning.Arm("full", "full"), planning.Arm("qlora", "qlora")]
    with pytest.raises(HarnessError, match=r"needed for the checkpoints of full, qlora .*only 64\.0 GB"):
        planning._check_disk(n, arms, tmp_path, checkpoints={"full": True, "qlora": True})
    planning._check_disk(n, arms, tmp_path, checkpoints={"full": False, "qlora": True})  # 40 GB: fits
