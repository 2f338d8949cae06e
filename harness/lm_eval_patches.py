"""Every change the harness makes to lm-eval's behaviour, in one place. lm-eval is otherwise used
through its public API (simple_evaluate, TaskManager, its model class interface); these are the
places where no public hook exists. Each keeps lm-eval's results as they are (tests/test_evaluate.py
and scripts/bench_eval.py compare per-document results with stock lm-eval):

- `cached_templates`: lm_eval.utils.apply_template, swapped within a block, compiles each distinct
  Jinja template once instead of once per document and field (70% of lm-eval's time on the suite).
- `read_docs_once`: a Task's evaluation documents read once into a list (lm-eval re-runs process_docs
  and decodes every row on each of its three passes).
- `guard_overflow`: a Task's perplexity aggregations return +inf where exp() overflows (a collapsed
  model's) instead of ending the whole evaluation with OverflowError.
"""

from __future__ import annotations

import contextlib
from functools import lru_cache


def read_docs_once(task) -> None:
    """eval_docs calls test_docs() (else validation_docs()); an instance attribute answers first."""
    docs = list(task.eval_docs)
    setattr(task, "test_docs" if task.has_test_docs() else "validation_docs", lambda: docs)


def guard_overflow(task) -> None:
    """lm-eval's perplexity aggregations are exp(mean negative log-likelihood): a collapsed model's
    overflows math.exp and ends the whole evaluation with OverflowError. Here it is +inf instead (the
    report marks it collapsed)."""
    import functools

    aggs = getattr(task, "_aggregation_list", None)
    if not isinstance(aggs, dict):
        return
    for metric, fn in list(aggs.items()):
        if getattr(fn, "_harness_guarded", False):
            continue

        @functools.wraps(fn)
        def guarded(items, _fn=fn):
            try:
                return _fn(items)
            except OverflowError:
                return float("inf")

        guarded._harness_guarded = True
        aggs[metric] = guarded


@contextlib.contextmanager
def cached_templates():
    """Within the block, lm-eval compiles each distinct Jinja template once (see the module doc)."""
    import lm_eval.utils as lm_utils

    original = lm_utils.apply_template
    if original is _apply_template:  # already inside a block
        yield
        return
    lm_utils.apply_template = _apply_template
    try:
        yield
    finally:
        lm_utils.apply_template = original


@lru_cache(maxsize=1024)
def _compiled(template: str):
    import lm_eval.utils as lm_utils

    return lm_utils.env.from_string(template)


def _apply_template(template: str, doc: dict) -> str:
    return _compiled(template).render(**doc)
