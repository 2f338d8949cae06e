"""harness adapters --base MODEL ADAPTER_DIR... [--task finance] [--suite] --out DIR

Several adapters on one loaded base: the base is loaded once, each adapter is loaded beside the
others (PEFT's load_adapter, named after its arm), and each in turn is switched on (set_adapter) and
evaluated on the task's in-domain lm-eval tasks (and the general suite with --suite). Timed: the base
load (once), each adapter's load and switch (milliseconds), each evaluation, and, for comparison,
reloading base + adapter from scratch (the first adapter), which is what switching tasks costs
without adapters on a shared base. Writes adapters.json and adapters.md under --out.

The tasks are evaluated as `harness compare` evaluates them (harness/evalplan.py): any lm-eval
task type, a group scored as lm-eval aggregates it, each suite's few-shot and chat-template settings,
the profile's document and generation limits; the suites' perplexity task is left to compare.

The base is loaded in 4-bit for QLoRA adapters (as the harness recorded beside them), in 16-bit for
the others; adapters of different bases, or QLoRA beside LoRA, are refused before a weight loads.
The caller's RunContext (device, remote code, pickled weights, --include-path task directories)
applies, as for compare.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

from harness import evalplan, evaluate, models
from harness.config import HarnessError, load_task
from harness.data import mirror_dir
from harness.io import write_json, write_text


def _name(path: Path, taken: set[str]) -> str:
    """The arm's name: work/<task>/<run>/<arm>/adapter -> <arm>; unique among the loaded adapters."""
    base = path.parent.name if path.name == "adapter" else path.name
    name, i = base, 2
    while name in taken or name == "default":
        name, i = f"{base}-{i}", i + 1
    return name


def _record(path: Path) -> dict:
    rec = path / models.ARM_RECORD
    return json.loads(rec.read_text()) if rec.is_file() else {}


def _base_of(path: Path, record: dict) -> str | None:
    """The base an adapter was trained on: the harness's record, else PEFT's adapter_config.json."""
    base = record.get("base_model") or json.loads((path / "adapter_config.json").read_text()).get(
        "base_model_name_or_path")
    return str(Path(base).expanduser().resolve()) if base and Path(base).expanduser().is_dir() else base


def run(*, base: str | None, adapters: list[Path], task: str = "finance", suite: bool = False,
        profile: str | None = None, mirror: str | None = None, out: Path) -> dict:
    import torch

    # Check everything before a weight loads.
    if not adapters:
        raise HarnessError("adapters: give at least one ADAPTER_DIR")
    for a in adapters:
        if not (Path(a) / "adapter_config.json").is_file():
            raise HarnessError(f"{a}: no adapter_config.json (not a PEFT adapter directory)")
    cfg = load_task(task)
    profile_name = profile or ("full" if models.device_kind() == "cuda" else "quick")
    if profile_name not in cfg.profiles:
        raise HarnessError(f"--profile {profile_name}: not defined under profiles: of task {cfg.name}")
    prof = cfg.profiles[profile_name]
    mirror_path = mirror_dir(mirror)
    plan = evalplan.build(cfg, cfg.suites if suite else [], mirror=mirror_path)
    records = [_record(Path(a)) for a in adapters]
    # One base for all: adapters trained on other bases (or on a 4-bit and a 16-bit one) would be
    # evaluated on a base they were not trained on, or fail to load with a shape error.
    bases = {str(a): _base_of(Path(a), r) for a, r in zip(adapters, records)}
    if base is None and len(set(bases.values()) - {None}) > 1:
        raise HarnessError("adapters: trained on different bases (" + "; ".join(f"{a}: {b}" for a, b in bases.items())
                           + "); evaluate each base's adapters in their own call")
    four_bit = sorted(str(a) for a, r in zip(adapters, records) if r.get("method") == "qlora")
    if four_bit and len(four_bit) < len(adapters):
        raise HarnessError(f"adapters: {', '.join(four_bit)} trained on the 4-bit base and the others on the 16-bit "
                           "one; evaluate QLoRA and LoRA adapters in separate calls (or merge the QLoRA adapter: "
                           "harness merge)")
    base = base or next((b for b in bases.values() if b), None)
    if not base:
        raise HarnessError(f"{adapters[0]}: no base model recorded; give --base MODEL")
    base_path = models.resolve_model(base).path
    quant = records[0].get("quant") if four_bit else None
    tokenizer = models.load_tokenizer(base_path)
    runs = plan.runs(prof, has_chat_template=tokenizer.chat_template is not None)
    tasks = [r.task for r in runs]
    eval_kw = dict(mirror=mirror_path, batch_size=prof.eval_batch_size, seed=cfg.training.seed,
                   backend=prof.eval_backend)

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    # One base, every adapter loaded beside the others.
    t = time.perf_counter()
    model = models.load_base(base_path, quant=quant)
    base_seconds = time.perf_counter() - t
    rows, taken = [], set()
    for path in adapters:
        name = _name(Path(path), taken)
        taken.add(name)
        t = time.perf_counter()
        model = models.attach_adapter(model, str(path), name=name)
        sync()
        rows.append({"adapter": name, "path": str(Path(path).resolve()), "load_ms": 1e3 * (time.perf_counter() - t),
                     "method": _record(Path(path)).get("method")})
    model.eval()
    for row in rows:  # switch, evaluate
        t = time.perf_counter()
        model.set_adapter(row["adapter"])
        sync()
        row["switch_ms"] = 1e3 * (time.perf_counter() - t)
        ev = evaluate.evaluate(model, tokenizer, runs, **eval_kw)
        row.update(eval_seconds=ev["seconds"], results=ev["results"], n=ev["n"], scores=scores(plan, ev))
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    # What switching costs without a shared base: base + adapter loaded from scratch.
    t = time.perf_counter()
    fresh = models.attach_adapter(models.load_base(base_path, quant=quant), str(adapters[0]))
    sync()
    reload_seconds = time.perf_counter() - t
    del fresh
    gc.collect()

    entries = [{"task": e.task, "metric": e.metric, "role": e.role, "kind": e.kind, "leaves": e.leaves}
               for e in plan.entries]
    result = {"base": base_path, "base_4bit": quant is not None, "task": cfg.name, "tasks": tasks, "entries": entries,
              "profile": profile_name, "limit": prof.limit, "generate_limit": prof.generate_limit,
              "eval_backend": prof.eval_backend, "device": models.device_kind(),
              "base_load_seconds": base_seconds, "reload_base_and_adapter_seconds": reload_seconds,
              "adapters": rows}
    out = Path(out)
    write_json(out / "adapters.json", result)
    write_text(out / "adapters.md", render_md(result))
    return result


def scores(plan: evalplan.EvalPlan, ev: dict) -> dict[str, float | None]:
    """Each entry's counted metric: a task's own value; a group's as lm-eval aggregates its subtasks."""
    out = {}
    for e in plan.entries:
        values = {leaf: ev["results"][leaf].get(e.metric) for leaf in e.leaves}
        out[e.task] = values[e.task] if e.kind != "group" else evalplan.group_score(e.to_dict(), values, ev["n"])
    return out


def _limits(r: dict) -> str:
    if r["limit"] is None and r.get("generate_limit") is None:
        return "all documents"
    text = f"at most {r['limit']} documents per task" if r["limit"] is not None else "all documents"
    if r.get("generate_limit") is not None:
        text += f", {r['generate_limit']} per generation task"
    return text


def render_md(r: dict) -> str:
    entries = r["entries"]
    heads = [f"{e['task']}{' (group)' if e['kind'] == 'group' else ''} {e['metric']}" for e in entries]
    lines = [f"# Adapters on one base: {Path(r['base']).name}", "",
             f"Base loaded once in {r['base_load_seconds']:.2f} s ({'4-bit NF4' if r['base_4bit'] else '16-bit'}, "
             f"{r['device']}); reloading base + adapter from scratch took {r['reload_base_and_adapter_seconds']:.2f} s. "
             f"Task {r['task']}: {', '.join(e['task'] for e in entries)} (profile {r['profile']}: {_limits(r)}).", "",
             "| adapter | method | load (ms) | switch (ms) | eval (s) | " + " | ".join(heads) + " |",
             "| --- | --- | --- | --- | --- |" + " --- |" * len(entries)]
    for row in r["adapters"]:
        values = [row["scores"].get(e["task"]) for e in entries]
        cells = " | ".join("-" if v is None else f"{v:.3f}" for v in values)
        lines.append(f"| {row['adapter']} | {row['method'] or '-'} | {row['load_ms']:.1f} | {row['switch_ms']:.2f} | "
                     f"{row['eval_seconds']:.1f} | {cells} |")
    return "\n".join(lines) + "\n"
