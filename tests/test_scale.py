"""Models at scales nothing here can download: random weights of an architecture (`--model
random:<preset or config.json>`), and jobs no GPU could hold refused before they start."""

from __future__ import annotations

import gc
import json

import pytest
import torch
from click.testing import CliRunner

from pathlib import Path

from harness import memory, models, parallel, train
from harness.cli import cli
from harness.config import PROJECT_ROOT, HarnessError, load_task

GiB = 2**30


@pytest.mark.slow  # a compare on the tiny architecture
def test_a_compare_on_random_weights_says_so(tmp_path, tiny_model, tiny_task, mirror, monkeypatch):
    monkeypatch.setattr(models, "DEFAULT_MODEL", str(tiny_model))  # the tokenizer it borrows
    args = ["compare", "--task", str(tiny_task), "--model", "random:tiny-llama", "--methods", "lora",
            "--profile", "quick", "--mirror", str(mirror), "--run-id", "rnd", "--results-dir", str(tmp_path / "r"),
            "--work-dir", str(tmp_path / "w")]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "r" / "finance" / "rnd"
    model = json.loads((run_dir / "config.json").read_text())["model"]
    assert model["source"] == "random" and "RANDOM WEIGHTS (seed 0) of tiny-llama" in model["detail"]
    cfg = json.loads((models.Path(model["path"]) / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (128, 2, 2048)  # the preset's
    assert "**Random weights: speed and memory only, scores meaningless.**" in (run_dir / "report.md").read_text()
    # Built once: a second resolution reuses the saved weights.
    again = models.resolve_model("random:tiny-llama")
    assert again.path == model["path"] and again.source == "random"


def test_random_weights_of_an_unknown_architecture_are_one_line(tmp_path):
    with pytest.raises(HarnessError, match="--model random: llama-9z: unknown preset; valid: llama-2-7b"):
        models.resolve_model("random:llama-9z")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(HarnessError, match="not a transformers config"):
        models.resolve_model(f"random:{tmp_path / 'config.json'}")


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    """config.json of the 1B and 8B presets: what the planning estimate reads (no weights)."""
    from transformers import LlamaConfig

    out = {}
    for arch in ("llama-3.2-1b", "llama-3.1-8b"):
        d = tmp_path_factory.mktemp(arch)
        LlamaConfig(**models.ARCH_PRESETS[arch]).save_pretrained(d)
        out[arch] = d
    return out


def _refusal(needs, totals, n, alternatives=None) -> str:
    with pytest.raises(HarnessError) as e:
        parallel.check_fits(needs, totals, n_params=n, alternatives=alternatives)
    return str(e.value)


def test_a_job_no_gpu_can_hold_is_refused_with_the_figure(llama_dirs):
    """8B full fine-tuning as tasks/finance.yaml sets it (fp32 AdamW) fits an H200 by the estimate, not
    an H100; the refusal names AdamW's moments in 8 bits where they would fit (a 100 GiB card), not
    where they would not: on an H100 (79.18 GiB) they ran out of memory, measured."""
    task, d = load_task("finance"), str(llama_dirs["llama-3.1-8b"])
    n = memory.model_shape(d, task)["total"]
    assert n == 8_030_261_248
    full, eight = memory.arm_bytes("full", d, n, task), memory.arm_bytes("full", d, n, task, optim="adamw_bnb_8bit")
    h100, h200 = 79.18 * GiB, 139.8 * GiB
    assert h200 > full > 100 * GiB > eight > h100
    parallel.check_fits({"full": full}, [h200], n_params=n)
    alts = {"full": [("8-bit", eight)]}
    msg = _refusal({"full": full}, [100 * GiB], n, alts)
    assert msg == (f"full: needs about {full / GiB:.0f} GiB of GPU memory by the harness's estimate (8.03 B "
                   f"parameters), more than the largest GPU here (100 GiB); 8-bit needs about {eight / GiB:.0f} GiB "
                   "and fits; or use lora or qlora, training.distributed=fsdp over several GPUs, or a smaller model")
    assert "and fits" not in _refusal({"full": full}, [h100], n, alts)
    parallel.check_fits({"full": full}, [], n_params=n)  # CPU: host memory is not estimated


def test_the_estimate_counts_what_holds_memory(llama_dirs):
    """Each term moves the estimate as the setting it models: KL's second fp32 model, 8-bit moments
    (but 32-bit ones for the embeddings, as HF Trainer keeps them), the micro-batch's activations,
    gradient checkpointing."""
    d = str(llama_dirs["llama-3.2-1b"])
    task = load_task("finance")
    counts = memory.model_shape(d, task)
    n, emb = counts["total"], counts["embedding"]
    assert emb == 128256 * 2048  # tied: one embedding matrix
    st = memory.settings(task, "full")
    assert (st["batch"], st["seq"]) == (16, 128)
    adamw = memory.estimate(counts, "full", st)
    eight = memory.estimate(counts, "full", {**st, "optimizer": "adamw_bnb_8bit"})
    assert adamw["optimizer"] - eight["optimizer"] == 6 * (n - emb)
    assert eight["peak"] == max(eight["weights"] + eight["master"] + eight["optimizer"] + eight["activations"],
                                eight["master"] + eight["optimizer"] + eight["grads"])
    lora = load_task("finance", ["methods.lora.micro_batch_size=32"])
    assert memory.train_bytes("lora", counts, lora) > memory.train_bytes("lora", counts, task)
    ckpt = load_task("finance", ["training.gradient_checkpointing=true"])
    assert memory.train_bytes("lora", counts, ckpt) < memory.train_bytes("lora", counts, task)
    nokl = load_task("finance", ["kl.enabled=false"])
    assert memory.eval_bytes(n, kl=True) - memory.eval_bytes(n) == 4 * n
    assert memory.arm_bytes("qlora", d, n, task) - memory.arm_bytes("qlora", d, n, nokl) == 4 * n  # KL decides qlora's


def _measured():
    """Every stage of results/scale with NVML's device-wide peak (one job at a time), as (run, arm,
    stage, method, overrides, arch, bytes): training, the references' evaluation, an arm's evaluation
    and its KL step."""
    import glob

    rows = []
    for path in sorted(glob.glob(str(PROJECT_ROOT / "results" / "scale" / "*" / "metrics.json"))):
        m = json.loads(Path(path).read_text())
        arch = m["model"]["detail"].split(" of ", 1)[1].split(":", 1)[0]
        config = json.loads((Path(path).parent / "config.json").read_text())
        # Before 2026-12-06 an arm's evaluation still held its training's optimizer state and CUDA-graph
        # pools (fixed by train.release; results/scale/README.md): those runs' training figures count.
        leaked = config["started"] < "2026-12-06"
        for arm, a in m["arms"].items():
            method = (a.get("train") or {}).get("method")
            for stage, figures in (("train", a.get("train")), ("eval", a.get("eval_resources")),
                                   ("kl", a.get("kl_resources"))):
                if leaked and stage != "train" and method is not None:
                    continue
                if (figures or {}).get("peak_nvml_used_bytes"):
                    rows.append((Path(path).parent.name, arm, stage, method, config["overrides"], arch,
                                 figures["peak_nvml_used_bytes"]))
    return rows


def test_the_estimate_is_over_every_peak_measured_at_scale(llama_dirs):
    """The planning estimate against the GPU's own figure (NVML: the CUDA context and the allocator's
    reserve included) of every stage measured at 1B and 8B (H100; 8B full fine-tuning on an H200):
    never under what planning reserves for the job (a job it plans would not run out of memory), and
    for training within 1.35x (it does not refuse what fits)."""
    rows = _measured()
    assert {(r[5], r[3]) for r in rows if r[2] == "train"} == {
        ("llama-3.2-1b", m) for m in ("full", "lora", "qlora")} | {("llama-3.1-8b", m) for m in ("full", "lora", "qlora")}
    assert {r[2] for r in rows} == {"train", "eval", "kl"}
    for run, arm, stage, method, overrides, arch, measured in rows:
        d = str(llama_dirs[arch])
        task = load_task("finance", [o for o in overrides if not o.startswith("profiles.")])
        counts = memory.model_shape(d, task)
        if stage == "train":
            est = memory.train_bytes(method, counts, task)
            assert est <= 1.35 * measured, f"{run} {arm}: estimate {est / GiB:.1f} GiB, measured {measured / GiB:.1f}"
        elif method is None:  # a reference (base, base-nf4)
            est = memory.eval_bytes(counts["total"])
        else:  # an arm's evaluation and KL step: the job's estimate
            est = memory.arm_bytes(method, d, counts["total"], task)
        assert est >= measured, f"{run} {arm} {stage}: estimate {est / GiB:.1f} GiB, measured {measured / GiB:.1f}"


def test_the_estimate_refuses_what_ran_out_of_memory(llama_dirs):
    """Measured on an H100 (79.18 GiB), 2026-12-06: 8B full fine-tuning with 8-bit AdamW ran out of
    memory, with CUDA graphs and without, after reaching 78 GiB allocated. The estimate must not plan it."""
    d = str(llama_dirs["llama-3.1-8b"])
    for graphs in ("true", "false"):
        task = load_task("finance", ["training.optim=adamw_bnb_8bit", f"training.cuda_graphs={graphs}"])
        assert memory.train_bytes("full", memory.model_shape(d, task), task) > 79.18 * GiB


def test_the_fit_check_runs_in_planning_before_any_weight_loads(tmp_path, tiny_model, tiny_task, mirror, monkeypatch):
    monkeypatch.setattr(models, "device_kind", lambda: "cuda")
    monkeypatch.setattr(parallel, "gpu_totals", lambda: [0.5 * GiB])
    loaded = []
    monkeypatch.setattr(models, "load_base", lambda *a, **k: loaded.append(a))
    args = ["compare", "--task", str(tiny_task), "--model", str(tiny_model), "--methods", "full", "--profile", "quick",
            "--mirror", str(mirror), "--run-id", "fit", "--results-dir", str(tmp_path / "r"), "--work-dir",
            str(tmp_path / "w")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    error = result.output.strip().splitlines()[-1]  # (after the progress bars of reading the data)
    assert error.startswith("Error: full: needs about ") and "more than the largest GPU here (0 GiB)" in error
    assert not loaded and not (tmp_path / "r" / "finance" / "fit" / "arms").exists()


def _live_storages() -> dict[int, int]:
    """Every tensor storage Python can reach: its address and size."""
    gc.collect()
    live = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not obj.is_meta:
            storage = obj.untyped_storage()
            live[storage.data_ptr()] = storage.nbytes()
    return live


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_bnb_8bit"])
def test_training_leaves_only_the_arm_for_its_evaluation(optim, tmp_path, tiny_model, tiny_task, mirror, monkeypatch):
    """The arm is evaluated in the process that trained it, so whatever training still holds (optimizer
    moments, gradients) would count in the evaluation's peak. The Trainer is kept alive here, as a
    traceback or a callback can keep it in a real run; only the arm's own tensors may remain."""
    kept = []
    real = train._trainer_class

    def keeping():
        class Kept(real()):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                kept.append(self)
        return Kept

    monkeypatch.setattr(train, "_trainer_class", keeping)
    task = load_task(str(tiny_task), [f"training.optim={optim}"])
    tok = models.load_tokenizer(str(tiny_model))
    examples, _ = train.training_examples(task, task.profiles["quick"], tok, mirror=mirror)
    before = _live_storages()
    model = train.run("full", task=task, profile=task.profiles["quick"], model_path=str(tiny_model),
                      examples=examples, out_dir=tmp_path / "full").model
    after = _live_storages()
    assert kept and kept[0].state.global_step > 0  # trained, and its Trainer is still alive
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    weights = sum(after[p] for p in own)
    left = sum(n for p, n in after.items() if p not in before and p not in own)
    # Adam's two moments alone are 2x the weights in fp32 (8-bit: 0.5x); a few scalars may remain.
    assert left < 0.01 * weights, f"{left} bytes beyond the arm's {weights}"


@pytest.mark.parametrize("method", ["full", "lora"])
def test_the_arm_is_evaluated_in_its_own_precision_not_trainings(method, tmp_path, tiny_model, tiny_task, mirror,
                                                                 monkeypatch):
    """On a GPU, training runs under bf16 autocast (TrainingArguments bf16=True), which accelerate
    installs by replacing model.forward. The arm must come back with its own forward: evaluated under
    bf16 autocast it would differ from the base, evaluated in its own dtype, by precision alone."""
    real = train._trainer_class
    amp = []

    def as_on_gpu():
        class MixedPrecision(real()):
            def __init__(self, *args, **kwargs):
                kwargs["args"].bf16, kwargs["args"].mixed_precision = True, "bf16"  # what bf16=cuda sets on a GPU
                super().__init__(*args, **kwargs)
                amp.append(self.accelerator.native_amp)
        return MixedPrecision

    monkeypatch.setattr(train, "_trainer_class", as_on_gpu)
    task = load_task(str(tiny_task), [])
    tok = models.load_tokenizer(str(tiny_model))
    examples, _ = train.training_examples(task, task.profiles["quick"], tok, mirror=mirror)
    model = train.run(method, task=task, profile=task.profiles["quick"], model_path=str(tiny_model),
                      examples=examples, out_dir=tmp_path / method).model
    assert amp == [True]  # trained under accelerate's bf16 autocast
    device = next(model.parameters()).device  # the test also runs on a GPU, where training moved it
    ids = torch.tensor([examples[0]["input_ids"][:16]], device=device)
    with torch.no_grad():
        got = model(input_ids=ids).logits
        own = type(model).forward(model, input_ids=ids).logits
        with torch.autocast(device.type, dtype=torch.bfloat16):
            bf16 = type(model).forward(model, input_ids=ids).logits.float()
    assert not torch.equal(bf16, own)  # the check below can tell the two precisions apart
    assert got.dtype == torch.float32 and torch.equal(got, own)
