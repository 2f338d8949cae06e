"""Configs as frozen dataclasses, loaded from YAML with dotted CLI overrides.

A task file (tasks/<name>.yaml) says what to train on and how; a suite file
(tasks/suites/<name>.yaml) says which lm-eval benchmarks measure forgetting.
Unknown keys are errors (with the nearest valid key suggested): a typo must never
silently run the default experiment.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TASKS_DIR = PROJECT_ROOT / "tasks"
SUITES_DIR = TASKS_DIR / "suites"
# Choices as types: the YAML loader checks a Literal field's value against them (one line naming the field).
MethodName = Literal["full", "lora", "qlora"]
EvalBackend = Literal["auto", "harness", "hf"]
METHODS: tuple[str, ...] = typing.get_args(MethodName)
PROFILES = ("quick", "full")
EVAL_BACKENDS: tuple[str, ...] = typing.get_args(EvalBackend)


class HarnessError(Exception):
    """A user-facing error: one line that names the file, field or value at fault."""


def _help(text: str, **kw) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass(frozen=True)
class TrainData:
    dataset: str = _help("hub id of the training data (read from the mirror when one is set)")
    config: str | None = _help("dataset config name; null for the default", default=None)
    split: str = _help("split to train on", default="train")
    format_task: str = _help(
        "lm-eval task (under tasks/) whose doc_to_text/doc_to_choice/doc_to_target format the "
        "training examples, so training and evaluation share one prompt",
        default="",
    )

    def __post_init__(self):
        if not self.format_task:
            raise HarnessError("train.format_task: required (the lm-eval task whose prompt formats training examples)")


@dataclass(frozen=True)
class EvalTask:
    task: str = _help("lm-eval task or group name (registered, or a YAML under tasks/); a group is evaluated as "
                      "its subtasks and reported as lm-eval aggregates it")
    metric: str = _help("the metric that counts for this task, as lm-eval logs it: `acc`, or `metric,filter` for a "
                        "filter other than none (e.g. `exact_match,strict-match`)", default="acc")
    num_fewshot: int | None = _help(
        "few-shot examples for this task; null: the suite's num_fewshot (in-domain tasks: 0, as training is "
        "zero-shot)", default=None)

    def __post_init__(self):
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise HarnessError(f"{self.task}: num_fewshot must be >= 0, got {self.num_fewshot}")


@dataclass(frozen=True)
class Training:
    epochs: float = _help("passes over the training examples", default=1.0)
    batch_size: int = _help("effective batch (shared by all methods: same steps, same examples)", default=16)
    max_length: int = _help("truncate training sequences to this many tokens", default=256)
    seed: int = _help("seed for data order, initialisation of adapters and dropout", default=0)
    warmup_ratio: float = _help("fraction of steps of linear warm-up", default=0.03)
    weight_decay: float = _help("AdamW weight decay", default=0.0)
    optim: str = _help(
        "HF Trainer's optimizer (a transformers OptimizerNames value). auto: adamw_torch_fused on a GPU, "
        "adamw_torch on CPU. adamw_bnb_8bit keeps AdamW's two moments in 8 bits (bitsandbytes): 2 bytes a "
        "parameter instead of 8, what lets full fine-tuning of an 8B model fit one 141 GB GPU", default="auto")
    lr_scheduler: str = _help("transformers scheduler name", default="linear")
    logging_steps: int = _help("log the loss every N steps", default=10)
    gradient_checkpointing: bool = _help("trade compute for activation memory", default=False)
    packing: bool = _help(
        "padding-free batches: a micro-batch's examples in one row, attention kept within each example "
        "(same loss as padding, less work)", default=True)
    save_minutes: float = _help(
        "save a resumable Trainer checkpoint once this many minutes have passed since the last (at a logging "
        "step); an interrupted arm resumes from the last one. 0: not by time", default=10.0)
    save_steps: int | None = _help("also save one every N steps (rounded up to a multiple of logging_steps)",
                                   default=None)
    compile: bool = _help(
        "torch.compile each repeated decoder block for training (one graph serves all blocks): fewer kernel "
        "launches per step, after a one-off compilation. Pays off only on long runs: on an H200, SmolLM2 full "
        "fine-tuning went 153 -> 89 ms/step after 14 s of compiling, QLoRA 434 -> 254 ms/step after 85 s",
        default=False)
    cuda_graphs: bool = _help(
        "on a GPU, capture one micro-step's forward and backward as CUDA graphs and replay them (packed rows "
        "padded to one length): removes per-layer Python and launch overhead, which bounds a small model's "
        "steps. Needs packing; off with gradient checkpointing or compile", default=True)
    distributed: Literal["none", "ddp", "fsdp"] = _help(
        "train each arm over several devices, one process each, through HF Trainer under `accelerate launch` "
        "(harness/distributed.py): ddp (every device a full copy, gradients averaged: LoRA/QLoRA, models that fit "
        "one device), fsdp (weights, gradients and optimizer state sharded, one decoder layer a unit: full "
        "fine-tuning of models that do not fit one device). Same examples, order and effective batch as on one "
        "device. none: one device", default="none")
    processes: int | None = _help(
        "processes (devices) for training.distributed; null: every visible GPU. On a CPU (gloo), give a number",
        default=None)
    eval_at: list[float] = _help(
        "forgetting curves: also evaluate the arm's weights at these fractions of its steps, e.g. [0.25, 0.5] "
        "(each a point `<arm>_at=0.25` of the report, evaluated like the arm; 1.0 is the arm itself)",
        default_factory=list)

    def __post_init__(self):
        for f in self.eval_at:
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
                raise HarnessError(f"training.eval_at: each entry a fraction of the steps in (0, 1], got {f!r}")
        if len(set(self.eval_at)) != len(self.eval_at):
            raise HarnessError(f"training.eval_at: listed twice in {self.eval_at}")
        if self.epochs <= 0:
            raise HarnessError(f"training.epochs: must be > 0, got {self.epochs}")
        if self.batch_size <= 0:
            raise HarnessError(f"training.batch_size: must be > 0, got {self.batch_size}")
        if self.max_length <= 8:
            raise HarnessError(f"training.max_length: must be > 8, got {self.max_length}")
        for name in ("logging_steps", "save_steps"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise HarnessError(f"training.{name}: must be > 0, got {getattr(self, name)}")
        if self.processes is not None and self.processes < 2:
            raise HarnessError(f"training.processes: at least 2 for training.distributed, got {self.processes}")
        if self.save_minutes < 0:
            raise HarnessError(f"training.save_minutes: must be >= 0, got {self.save_minutes}")
        if not 0 <= self.warmup_ratio < 1:
            raise HarnessError(f"training.warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")


@dataclass(frozen=True)
class Method:
    learning_rate: float = _help("peak learning rate")
    micro_batch_size: int = _help(
        "per-step batch on the device; gradient accumulation makes up training.batch_size", default=16
    )

    def __post_init__(self):
        if self.learning_rate <= 0:
            raise HarnessError(f"learning_rate: must be > 0, got {self.learning_rate}")
        if self.micro_batch_size <= 0:
            raise HarnessError(f"micro_batch_size: must be > 0, got {self.micro_batch_size}")


@dataclass(frozen=True)
class Profile:
    train_examples: int | None = _help("training examples to use (first N after a seeded shuffle); null = all", default=None)
    limit: int | None = _help("documents per evaluation task (lm-eval `limit`); null = all", default=None)
    eval_batch_size: int = _help("lm-eval batch size", default=8)
    eval_backend: EvalBackend = _help(
        "lm-eval model class: harness (shared-prefix scoring of multiple-choice tasks, same results), hf "
        "(lm-eval's stock HFLM, to verify), or auto: harness (measured faster on the H200 and on 2 CPU cores)",
        default="auto")
    eval_processes: int | None = _help(
        "evaluate each model over this many processes, one model copy each, through lm-eval's own data-parallel "
        "path (harness/distributed.py): on several GPUs, their number; the per-document results are the same. "
        "null: one process", default=None)
    batch_size: int | None = _help("effective training batch for this profile; null = training.batch_size", default=None)
    max_steps: int | None = _help("cap on optimizer steps; null = from epochs", default=None)
    perplexity_limit: int | None = _help("documents of the suite's perplexity task; null = all", default=None)
    quant_reference: bool = _help(
        "with a qlora arm, also evaluate the base quantized as QLoRA loads it (no adapter): separates what "
        "4-bit quantization costs from what training does", default=False)
    generate_limit: int | None = _help(
        "documents per generate_until task (generation costs far more than scoring); null = limit", default=None)
    max_gen_toks: int | None = _help(
        "cap on generated tokens per document for generate_until tasks; null = each task's own", default=None)
    kl_documents: int | None = _help(
        "documents per text source for KL(base || arm): WikiText pages, domain prompts; null = all "
        "(perplexity_limit and limit still bound them)", default=None)

    def __post_init__(self):
        for name in ("train_examples", "limit", "max_steps", "batch_size", "perplexity_limit", "generate_limit",
                     "max_gen_toks", "kl_documents", "eval_processes"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise HarnessError(f"profiles.*.{name}: must be a positive number or null, got {v}")
        if self.eval_batch_size <= 0:
            raise HarnessError(f"profiles.*.eval_batch_size: must be > 0, got {self.eval_batch_size}")
        if self.eval_backend not in EVAL_BACKENDS:
            raise HarnessError(f"profiles.*.eval_backend: must be one of {', '.join(EVAL_BACKENDS)}, "
                               f"got {self.eval_backend!r}")


@dataclass(frozen=True)
class TaskConfig:
    name: str = _help("task name, used in results/<name>/")
    train: TrainData = _help("training data")
    in_domain: list[EvalTask] = _help("lm-eval tasks that measure learning (in-domain)")
    suite: Any = _help("suite(s) that measure forgetting: a name (tasks/suites/<suite>.yaml) or a path, or a list "
                       "of them (e.g. [general, instruct])", default="general")
    description: str = _help("one line for the report", default="")
    training: Training = _help("shared training settings", default_factory=Training)
    methods: dict[str, Method] = _help("per-method settings: full, lora, qlora", default_factory=dict)
    lora: dict[str, Any] = _help(
        "passed as-is to peft.LoraConfig",
        default_factory=lambda: {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"},
    )
    quant: dict[str, Any] = _help(
        "passed as-is to transformers.BitsAndBytesConfig for qlora",
        default_factory=lambda: {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": "bfloat16",
        },
    )
    profiles: dict[str, Profile] = _help("quick and full profiles", default_factory=dict)
    kl: "KLConfig" = _help("distribution drift: KL(base || arm) of next-token distributions",
                           default_factory=lambda: KLConfig())
    mitigation: "Mitigation" = _help("ways to forget less: frozen bottom layers, L2 toward the base, replay, "
                                     "interpolation toward the base",
                                     default_factory=lambda: Mitigation())

    @property
    def suites(self) -> list[str]:
        return [self.suite] if isinstance(self.suite, str) else list(self.suite)

    def __post_init__(self):
        if isinstance(self.suite, str):
            pass
        elif not (isinstance(self.suite, list) and self.suite and all(isinstance(x, str) for x in self.suite)):
            raise HarnessError(f"suite: a suite name or a non-empty list of names, got {self.suite!r}")
        for m in self.methods:
            if m not in METHODS:
                raise HarnessError(f"methods.{m}: unknown method; valid: {', '.join(METHODS)}")
        for p in self.profiles:
            if p not in PROFILES:
                raise HarnessError(f"profiles.{p}: unknown profile; valid: {', '.join(PROFILES)}")
        if not self.in_domain:
            raise HarnessError("in_domain: list at least one lm-eval task that measures learning")
        r = self.lora.get("r", 16)
        if not isinstance(r, int) or r <= 0:
            raise HarnessError(f"lora.r: must be a positive integer, got {r!r}")


@dataclass(frozen=True)
class Replay:
    """General text mixed into an arm's training examples (harness/replay.py)."""

    fraction: float = _help("share of the training mix that is replay, in (0, 1): replay examples = "
                            "fraction / (1 - fraction) x the domain examples")
    source: str = _help(
        "`self`: the base model's own samples from an empty context (no outside data, nothing evaluated); or a "
        "hub dataset id (read from the mirror when one is set) whose `field` is plain text", default="self")
    config: str | None = _help("dataset config name (source a dataset)", default=None)
    split: str = _help("dataset split (source a dataset); one an evaluated task scores is refused", default="train")
    field: str = _help("the dataset's text column (source a dataset)", default="text")
    max_new_tokens: int = _help("source self: tokens per sample (training.max_length also bounds it)", default=128)

    def __post_init__(self):
        if isinstance(self.fraction, bool) or not 0 < self.fraction < 1:
            raise HarnessError(f"mitigation.replay.fraction: must be in (0, 1), got {self.fraction!r}")
        if not self.source:
            raise HarnessError("mitigation.replay.source: `self` or a dataset id")
        if self.max_new_tokens < 1:
            raise HarnessError(f"mitigation.replay.max_new_tokens: must be >= 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class Mitigation:
    """Ways to forget less, as arm settings (each recorded in the arm's inputs, so a change retrains)."""

    freeze_layers: int = _help(
        "freeze the lowest N decoder layers: their weights (full) or their adapters (lora, qlora) do not "
        "train (Zheng et al. 2025, spurious forgetting sits in the bottom layers); 0: none", default=0)
    l2_to_base: float = _help(
        "full fine-tuning: add lambda x sum of (theta - theta_base)^2 over the trained weights to the loss, "
        "pulling them toward the base (keeps an fp32 copy of the base weights; steps run without CUDA "
        "graphs); 0: off", default=0.0)
    replay: Replay | None = _help(
        "mix general text into training: {fraction: 0.1, source: self} (the base's own samples) or {fraction, "
        "source: <dataset id>, config, split, field} (Bethune et al. 2025: ~1% pretraining data kept forgetting "
        "down); null: off", default=None)
    interpolate: list[float] = _help(
        "weight interpolation after training, no retraining (WiSE-FT): evaluate theta_base + alpha x "
        "(theta - theta_base) for full fine-tuning, the adapter scaled by alpha for lora/qlora, at each alpha "
        "listed (points `<arm>_alpha=0.5` of the report; 1 is the arm, 0 its starting point)",
        default_factory=list)

    def __post_init__(self):
        for a in self.interpolate:
            if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1:
                raise HarnessError(f"mitigation.interpolate: each alpha in [0, 1], got {a!r}")
        if len(set(self.interpolate)) != len(self.interpolate):
            raise HarnessError(f"mitigation.interpolate: listed twice in {self.interpolate}")
        if not isinstance(self.freeze_layers, int) or self.freeze_layers < 0:
            raise HarnessError(f"mitigation.freeze_layers: must be an integer >= 0, got {self.freeze_layers!r}")
        if self.l2_to_base < 0:
            raise HarnessError(f"mitigation.l2_to_base: must be >= 0, got {self.l2_to_base}")


@dataclass(frozen=True)
class KLConfig:
    enabled: bool = _help("compute mean per-token KL(base || arm) on general text and on domain prompts", default=True)
    max_tokens: int = _help("tokens per document (the first N): bounds the two models' full-vocabulary logits",
                            default=1024)
    domain_task: str | None = _help("lm-eval task whose evaluation prompts are the domain text; null: "
                                    "train.format_task", default=None)

    def __post_init__(self):
        if self.max_tokens < 2:
            raise HarnessError(f"kl.max_tokens: must be >= 2, got {self.max_tokens}")


@dataclass(frozen=True)
class PerplexityTask:
    task: str = _help("lm-eval loglikelihood_rolling task, e.g. wikitext")
    batch_size: int = _help("its own batch: rolling windows of the full context are memory-hungry", default=1)

    def __post_init__(self):
        if self.batch_size <= 0:
            raise HarnessError(f"perplexity.batch_size: must be > 0, got {self.batch_size}")


@dataclass(frozen=True)
class SuiteConfig:
    name: str = _help("suite name")
    tasks: list[EvalTask] = _help("lm-eval tasks and the metric that counts for each")
    description: str = _help("one line for the report", default="")
    num_fewshot: int = _help("few-shot examples per prompt (a task's own num_fewshot wins)", default=0)
    apply_chat_template: Literal["auto", True, False] = _help(
        "format prompts with the model's chat template (lm-eval's apply_chat_template); auto: when the "
        "tokenizer has one", default=False)
    system_instruction: str | None = _help(
        "a system prompt before every prompt of the suite (lm-eval's system_instruction): the system turn "
        "with a chat template, else text before the prompt", default=None)
    fewshot_as_multiturn: bool | None = _help(
        "with a chat template, few-shot examples as alternating user and assistant turns (lm-eval's "
        "fewshot_as_multiturn); null: lm-eval's default", default=None)
    perplexity: PerplexityTask | None = _help("a continuous signal beside the accuracies (word perplexity, bits per byte)",
                                              default=None)

    def __post_init__(self):
        if not self.tasks:
            raise HarnessError(f"suite {self.name}: tasks is empty")
        if self.fewshot_as_multiturn is not None and self.apply_chat_template is False:
            raise HarnessError(f"suite {self.name}: fewshot_as_multiturn needs apply_chat_template (true or auto): "
                               "without a chat template there are no turns")


# ---------------------------------------------------------------- loading


def _unwrap(tp):
    """Optional[X] -> X; other types unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def build(cls, data: Any, where: str):
    """Build dataclass `cls` from a plain dict, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise HarnessError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else f" (valid: {', '.join(sorted(names))})"
            raise HarnessError(f"{where}: unknown key '{key}'{hint}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise HarnessError(f"{where}: missing required key '{f.name}' ({f.metadata.get('help', '')})")
            continue
        kwargs[f.name] = _coerce(hints[f.name], data[f.name], f"{where}: {f.name}")
    try:
        return cls(**kwargs)
    except HarnessError as e:
        raise HarnessError(f"{where}: {e}") from None


def _coerce(tp, value, where):
    tp_ = _unwrap(tp)
    origin = typing.get_origin(tp_)
    if value is None:
        if tp_ is not tp or tp is Any:
            return None
        raise HarnessError(f"{where}: must not be null")
    if dataclasses.is_dataclass(tp_):
        return build(tp_, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise HarnessError(f"{where}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp_)
        return [_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise HarnessError(f"{where}: expected a mapping, got {value!r}")
        _, inner = typing.get_args(tp_)
        return {k: _coerce(inner, v, f"{where}.{k}") for k, v in value.items()}
    if origin is Literal:
        if value not in typing.get_args(tp_):
            raise HarnessError(f"{where}: {value!r} is not one of {typing.get_args(tp_)}")
        return value
    if tp_ is Any:
        return value
    if tp_ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp_ is float and isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp_ is int and isinstance(value, bool) or not isinstance(value, tp_):
        raise HarnessError(f"{where}: expected {tp_.__name__}, got {value!r}")
    return value


def read_yaml(path: Path) -> dict:
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark else ""
        raise HarnessError(f"{path}:{at} YAML syntax error: {getattr(e, 'problem', e)}") from None
    except OSError as e:
        raise HarnessError(f"{path}: cannot read ({e.strerror})") from None
    return data or {}


def apply_overrides(data: dict, overrides: list[str], where: str) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise HarnessError(f"override '{item}': expected key.path=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw)
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise HarnessError(f"override '{item}': {p} is not a section in {where}")
        node[parts[-1]] = value
    return data


def _named_file(directory: Path, name: str, kind: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    path = directory / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in directory.glob("*.yaml"))
        raise HarnessError(f"unknown {kind} '{name}': no {path}; available: {', '.join(known) or 'none'}")
    return path


def task_path(name: str) -> Path:
    """The task file `--task NAME` names: tasks/<NAME>.yaml, or a path."""
    return _named_file(TASKS_DIR, name, "task")


def load_task(name: str, overrides: list[str] | None = None) -> TaskConfig:
    path = task_path(name)
    data = apply_overrides(read_yaml(path), overrides or [], str(path))
    return build(TaskConfig, data, str(path))


def load_suite(name: str) -> SuiteConfig:
    path = _named_file(SUITES_DIR, name, "suite")
    return build(SuiteConfig, read_yaml(path), str(path))


def to_dict(obj) -> Any:
    """Dataclass -> plain JSON-able data (for config.json in the run)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
