"""Which lm-eval tasks a run evaluates, and how: checked before a weight loads.

    harness compare --task finance --suite general --suite instruct

A run's suites (the task file's `suite:`, or `--suite`, repeatable) are merged into one list of
entries; each entry is an lm-eval task or group (groups and tags are expanded into their subtasks,
evaluated one by one and reported as lm-eval aggregates them), with the metric that counts, its
few-shot count (the entry's own, else its suite's; in-domain tasks default to 0, as training is
zero-shot) and whether prompts go through the model's chat template (the suite's setting).
Every counted metric is checked against what its task logs (metric, filter, per-document number)
and every dataset against the mirror, so a mistake is one line naming the task, metric or file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from harness import evaluate
from harness.config import EvalTask, HarnessError, PerplexityTask, Profile, SuiteConfig, TaskConfig, load_suite, to_dict

# lm-eval tasks whose code needs NLTK's sentence tokenizer (punkt_tab) at import.
NLTK_TASK_PREFIXES = ("ifeval",)


@dataclass
class Entry:
    """One suite or in-domain entry: a task, or a group and its subtasks (leaves)."""

    task: str
    metric: str
    num_fewshot: int
    chat_template: bool | str  # True, False, or "auto" (resolved once the tokenizer is known)
    role: str  # "suite" | "in_domain"
    suite: str | None
    kind: str = "task"
    leaves: list[str] = field(default_factory=list)
    groups: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # leaf -> task_info
    output_type: str = ""
    system_instruction: str | None = None  # the suite's (lm-eval's system_instruction)
    fewshot_as_multiturn: bool | None = None  # the suite's; None: lm-eval's default

    def to_dict(self) -> dict:
        # The prompt settings only where set: records of runs without them read as before.
        prompt = {k: v for k, v in (("system_instruction", self.system_instruction),
                                    ("fewshot_as_multiturn", self.fewshot_as_multiturn)) if v is not None}
        return {"task": self.task, "metric": self.metric, "num_fewshot": self.num_fewshot,
                "chat_template": self.chat_template, "role": self.role, "suite": self.suite, "kind": self.kind,
                "leaves": self.leaves, "groups": self.groups, "output_type": self.output_type,
                "higher_is_better": {leaf: i["higher_is_better"] for leaf, i in self.info.items()}, **prompt}


@dataclass
class EvalPlan:
    suite: SuiteConfig | None  # the merged suite (name "a+b"), for the report and the config record; None: in-domain only
    entries: list[Entry]
    perplexity: PerplexityTask | None

    @property
    def leaves(self) -> list[str]:
        out: list[str] = []
        for e in self.entries:
            out += [t for t in e.leaves if t not in out]
        return out

    def suite_entries(self) -> list[Entry]:
        return [e for e in self.entries if e.role == "suite"]

    def domain_entries(self) -> list[Entry]:
        return [e for e in self.entries if e.role == "in_domain"]

    def runs(self, profile: Profile, *, has_chat_template: bool) -> list[evaluate.TaskRun]:
        """The leaves as the evaluator runs them, with this profile's limits."""
        out = []
        for e in self.entries:
            chat = has_chat_template if e.chat_template == "auto" else bool(e.chat_template)
            for leaf in e.leaves:
                if any(r.task == leaf for r in out):
                    continue
                gen = e.info[leaf]["output_type"] == "generate_until"
                # `<task>@answer` scores the same documents as its generate_until task.
                same_docs = gen or evaluate.is_answer(leaf)
                limit = (profile.generate_limit or profile.limit) if same_docs else profile.limit
                out.append(evaluate.TaskRun(leaf, num_fewshot=e.num_fewshot, chat_template=chat,
                                            max_gen_toks=profile.max_gen_toks if gen else None, limit=limit,
                                            system_instruction=e.system_instruction,
                                            fewshot_as_multiturn=e.fewshot_as_multiturn if chat else None))
        return out

    def record(self) -> dict:
        return {"entries": [e.to_dict() for e in self.entries],
                "perplexity": to_dict(self.perplexity) if self.perplexity else None}


def build(task: TaskConfig, suite_names: list[str], *, mirror: Path | None) -> EvalPlan:
    """Suites merged, entries expanded and checked (names, metrics, filters, mirror, NLTK data). No
    suite names: the in-domain tasks alone (`harness adapters` without --suite)."""
    suites = [load_suite(s) for s in suite_names]
    entries: list[Entry] = []
    for s in suites:
        for t in s.tasks:
            entries.append(_entry(t, role="suite", suite=s, default_fewshot=s.num_fewshot,
                                  chat=s.apply_chat_template))
    for t in task.in_domain:
        entries.append(_entry(t, role="in_domain", suite=None, default_fewshot=0, chat=False))
    seen: dict[str, Entry] = {}
    for e in entries:
        if e.task in seen and e.role == seen[e.task].role:
            raise HarnessError(f"task {e.task}: listed twice (suites {seen[e.task].suite} and {e.suite}); keep one")
        seen.setdefault(e.task, e)
    perplexities = {s.perplexity.task: s.perplexity for s in suites if s.perplexity is not None}
    if len(perplexities) > 1:
        raise HarnessError(f"suites {', '.join(s.name for s in suites)}: more than one perplexity task "
                           f"({', '.join(perplexities)}); keep one")
    perplexity = next(iter(perplexities.values()), None)
    if perplexity is not None and perplexity.task in [e.task for e in entries]:
        raise HarnessError(f"task {perplexity.task}: is the suite's perplexity task and also listed as a task; "
                           "list it once")
    names = [e.task for e in entries] + [task.train.format_task] + ([perplexity.task] if perplexity else [])
    evaluate.check_tasks(names)
    for e in entries:
        ex = evaluate.expand(e.task)
        e.kind, e.leaves, e.groups = ex["kind"], ex["leaves"], ex["groups"]
    _check_nltk([leaf for e in entries for leaf in e.leaves] + [task.train.format_task])
    leaf_settings: dict[str, tuple] = {}
    for e in entries:
        _resolve(e, leaf_settings, mirror=mirror)
    # A free-text in-domain task also counts its reference answer's likelihood (harness/answer.py):
    # a finer measure of learning than exact match, paired per document on the same documents.
    listed = {e.task for e in entries}
    for i in range(len(entries) - 1, -1, -1):
        e = entries[i]
        name = evaluate.answer_task(e.task)
        if e.role == "in_domain" and e.kind == "task" and e.output_type == "generate_until" and name not in listed:
            derived = Entry(task=name, metric=evaluate.ANSWER_METRIC, num_fewshot=e.num_fewshot,
                            chat_template=e.chat_template, role="in_domain", suite=None, kind="task", leaves=[name])
            _resolve(derived, leaf_settings, mirror=mirror)
            entries.insert(i + 1, derived)
    merged = SuiteConfig(name="+".join(s.name for s in suites),
                         tasks=[EvalTask(e.task, e.metric, e.num_fewshot) for e in entries if e.role == "suite"],
                         description="; ".join(s.description for s in suites if s.description),
                         num_fewshot=suites[0].num_fewshot, perplexity=perplexity) if suites else None
    return EvalPlan(suite=merged, entries=entries, perplexity=perplexity)


def leaf_weights(e: dict, sizes: dict[str, int]) -> dict[str, float]:
    """Each subtask's share of a group's aggregate, as lm-eval computes it level by level: children
    weighted by their size (weight_by_size, the default) or equally; a group without an
    aggregate_metric_list counts its children equally."""
    groups = e["groups"]

    def size(node: str) -> int:
        return sizes.get(node, 0) if node not in groups else sum(size(c) for c in groups[node]["children"])

    def walk(node: str, share: float, out: dict) -> None:
        if node not in groups:
            out[node] = out.get(node, 0.0) + share
            return
        children = groups[node]["children"]
        agg = groups[node]["aggregate"] or []
        by_size = all(a.get("weight_by_size", True) for a in agg) if agg else False
        w = [size(c) if by_size else 1 for c in children]
        total = sum(w) or 1
        for c, wc in zip(children, w):
            walk(c, share * wc / total, out)

    out: dict[str, float] = {}
    walk(e["task"], 1.0, out)
    return out


def group_score(e: dict, scores: dict[str, float | None], sizes: dict[str, int]) -> float | None:
    """A group's score from its subtasks' (leaf_weights); None where a subtask has none."""
    if any(v is None for v in scores.values()):
        return None
    w = leaf_weights(e, sizes)
    return sum(w[leaf] * v for leaf, v in scores.items())


def _resolve(e: Entry, leaf_settings: dict, *, mirror: Path | None) -> None:
    """Each leaf's settings (one evaluation per leaf), what it logs, and the counted metric checked."""
    settings = (e.num_fewshot, e.chat_template, e.system_instruction, e.fewshot_as_multiturn)
    for leaf in e.leaves:
        if leaf in leaf_settings and leaf_settings[leaf][0] != settings:
            raise HarnessError(f"task {leaf}: evaluated twice with different few-shot, chat or system-prompt settings "
                               f"(in {leaf_settings[leaf][1]} and {e.task}); one evaluation serves both")
        leaf_settings[leaf] = (settings, e.task)
        if mirror is not None:
            evaluate.task_config(leaf, mirror=mirror)  # names the dataset missing from the mirror
        info = evaluate.task_info(leaf, mirror=mirror)
        e.info[leaf] = info
        where = f"{'suite ' + e.suite if e.suite else 'in_domain'}: {e.task}"
        evaluate.check_metric(leaf, e.metric, info, where=where)
        if e.kind == "group":
            _check_aggregate(e, leaf)
    e.output_type = "+".join(sorted({e.info[leaf]["output_type"] for leaf in e.leaves}))


def _entry(t: EvalTask, *, role: str, suite: SuiteConfig | None, default_fewshot: int, chat) -> Entry:
    return Entry(task=t.task, metric=t.metric, num_fewshot=t.num_fewshot if t.num_fewshot is not None else default_fewshot,
                 chat_template=chat, role=role, suite=suite.name if suite else None,
                 system_instruction=suite.system_instruction if suite else None,
                 fewshot_as_multiturn=suite.fewshot_as_multiturn if suite else None)


def _check_aggregate(e: Entry, leaf: str) -> None:
    """A group counted by a metric it does not aggregate has no lm-eval score to report."""
    top = e.groups[e.task]["aggregate"]
    if top is not None and top and e.metric.partition(",")[0] not in [a["metric"] for a in top]:
        raise HarnessError(f"group {e.task}: aggregates {', '.join(a['metric'] for a in top)}, not '{e.metric}'; "
                           "count one of those")


def _check_nltk(leaves: list[str]) -> None:
    """IFEval's checks split sentences with NLTK's punkt_tab, which lm-eval downloads at import: with no
    network that fails later, inside the evaluation. Look for it now."""
    needs = [t for t in leaves if t.startswith(NLTK_TASK_PREFIXES)]
    if not needs:
        return
    for module in ("nltk", "langdetect", "immutabledict"):
        try:
            __import__(module)
        except ImportError:
            raise HarnessError(f"task {needs[0]}: needs the Python package {module} (pip install 'lm-eval[ifeval]')") from None
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab")
    except LookupError:
        where = os.environ.get("NLTK_DATA") or "unset"
        raise HarnessError(f"task {needs[0]}: NLTK's punkt_tab is not found (NLTK_DATA={where}; searched "
                           f"{', '.join(nltk.data.path[:3])}...); set NLTK_DATA to a directory holding "
                           "tokenizers/punkt_tab (e.g. ../shared/nltk_data)") from None
