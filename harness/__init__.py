"""Catastrophic-forgetting evaluation harness: full fine-tuning vs (Q)LoRA, measured with lm-eval.

The modules in layers, lowest first. A module imports only from its own layer or a lower one, and
the imports have no cycle (tests/test_pipeline.py reads every import, lazy ones included):

- foundation: configs as dataclasses (config), what a run may do (context), the run directory's
  typed records (records), atomic files and logging (io), datasets and the mirror (data), memory
  and time (resources), statistics (stats), plots and HTML (plots, render), job scheduling (parallel)
- backends, thin wrappers over transformers, peft, bitsandbytes, accelerate and lm-eval: models,
  memory (what a job needs on a GPU, before it loads), train, distributed (an arm over several devices), drift,
  points, replay, evaluate with its lm-eval model class and patches (fastlm, answer, lm_eval_patches),
  lm-eval's corpus-level metrics per document (corpus), evalplan, baselines, provenance
- stages of a compare: planning -> references and arms (both through scoring) -> report
- pipeline: compare, top to bottom
- tools and the command line: sweep, adapters, merge, profile, cli
"""

__version__ = "0.1.0"

LAYERS = {
    "foundation": ("config", "context", "records", "io", "data", "resources", "stats", "plots", "render", "parallel"),
    "backends": ("models", "memory", "train", "distributed", "drift", "points", "replay", "evaluate", "fastlm", "answer",
                 "lm_eval_patches", "corpus", "evalplan", "baselines", "provenance"),
    "stages": ("planning", "scoring", "references", "arms", "report"),
    "pipeline": ("pipeline",),
    "tools": ("sweep", "adapters", "merge", "profile", "cli", "__main__"),
}
