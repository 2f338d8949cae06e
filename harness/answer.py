"""`<task>@answer`: the log-likelihood of a free-text task's reference answer, as bits per byte.

A generate_until task's own metric (exact match, ROUGE...) says whether the greedy answer is right;
it moves in steps and is often 0 for a small model before and after training. How much more likely
the reference answer became is the finer measure of learning (and, on a general task, of
forgetting), paired per document: for the prompt lm-eval builds, score
`target_delimiter + doc_to_target` (the text a free-text domain trains on, see
evaluate.formatter) as one loglikelihood request, and log (loglik, bytes) per document, which
lm-eval's own `bits_per_byte` aggregation turns into -sum(loglik) / (sum(bytes) ln 2).

The task is lm-eval's own ConfigurableTask over the same config (documents, prompt, few-shot), built
through lm-eval's `class:` route for Python tasks; only the request and the per-document result differ.
"""

from __future__ import annotations

from lm_eval.api.instance import Instance
from lm_eval.api.task import ConfigurableTask

SUFFIX = "@answer"
METRIC = "bits_per_byte"


def derive(config: dict, name: str) -> dict:
    """The config of `name` (= base + SUFFIX) from the base generate_until task's full config."""
    cfg = {k: v for k, v in config.items() if k not in ("generation_kwargs", "filter_list", "repeats", "tag")}
    cfg.update({"task": name, "output_type": "loglikelihood", "class": AnswerTask, "process_results": None,
                "metric_list": [{"metric": METRIC, "aggregation": METRIC, "higher_is_better": False}]})
    return cfg


class AnswerTask(ConfigurableTask):
    """One loglikelihood request per document: the prompt, then the delimiter and the first reference."""

    def __init__(self, config: dict | None = None, **kwargs) -> None:
        config = {k: v for k, v in (config or {}).items() if k != "class"}  # TaskConfig has no `class` field
        super().__init__(config=config, **kwargs)

    def _answer(self, doc: dict, *, chat: bool) -> str:
        target = self.doc_to_target(doc)
        if isinstance(target, list):  # several references: the first, as training uses (evaluate.formatter)
            target = target[0] if target else ""
        # With a chat template the answer opens the assistant's turn: no delimiter, as lm-eval does for
        # multiple choice (unless a gen_prefix without trailing space precedes it).
        prefix = self.config.gen_prefix
        delim = self.config.target_delimiter if not chat or (prefix and not prefix[-1:].isspace()) else ""
        return delim + str(target)

    def construct_requests(self, doc: dict, ctx, **kwargs) -> Instance:
        chat = bool(kwargs.pop("apply_chat_template", False))
        kwargs.pop("chat_template", None)
        self._chat = chat  # process_results counts the bytes of the same text
        return Instance(request_type="loglikelihood", doc=doc, arguments=(ctx, self._answer(doc, chat=chat)), idx=0,
                        **kwargs)

    def process_results(self, doc: dict, results) -> dict:
        loglik, _greedy = results[0]
        return {METRIC: (loglik, len(self._answer(doc, chat=getattr(self, "_chat", False)).encode("utf-8")))}
