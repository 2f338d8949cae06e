"""The `harness` command: thin click wrappers over the pipeline stages."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from harness import __version__
from harness.config import METHODS, PROFILES, PROJECT_ROOT, HarnessError


class UserError(click.ClickException):
    """A user mistake: one line on stderr, exit code 2, no traceback."""

    exit_code = 2


def _methods(ctx, param, value: str) -> tuple[str, ...]:
    items = tuple(m.strip() for m in value.split(",") if m.strip())
    bad = [m for m in items if m not in METHODS]
    if bad or not items:
        raise click.BadParameter(f"unknown method '{(bad or [value])[0]}'; valid: {', '.join(METHODS)}")
    return items


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="harness")
def cli():
    """Measure what fine-tuning costs a model: general ability lost with full fine-tuning vs
    (Q)LoRA, with lm-eval benchmarks before and after, memory, time and storage."""


def _context_options(*, include_path: bool) -> list:
    """What a command may load and run (harness/context.py): the same options wherever a model loads."""
    options = [
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                     help="auto: the GPU when there is one. cuda fails at once where there is none."),
        click.option("--trust-remote-code", is_flag=True,
                     help="Allow a model that ships its own Python code (config.json auto_map). Off by default."),
        click.option("--allow-pickle", is_flag=True,
                     help="Accept .bin/.pt weights (unpickling can run code). Default: safetensors only."),
    ]
    if include_path:
        options.append(click.option(
            "--include-path", multiple=True, type=click.Path(exists=True, file_okay=False),
            help="Another directory of lm-eval task YAMLs besides tasks/ (their !function hooks run as Python); "
                 "repeatable."))
    return options


def _context(device="auto", trust_remote_code=False, allow_pickle=False, include_path=()):
    """The RunContext those options ask for, checked (one line naming the option otherwise)."""
    from harness import context

    return context.RunContext.checked(device=device, trust_remote_code=trust_remote_code,
                                      allow_pickle=allow_pickle, include_paths=include_path)


def _with_options(options: list):
    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn
    return decorate


def run_options(fn):
    """Options shared by compare and sweep (sqlite-utils style reusable decorators)."""
    options = [
        click.option("--task", default="finance", show_default=True, help="Task file: tasks/<TASK>.yaml, or a path."),
        click.option("--model", default="smollm2-135m-instruct", show_default=True,
                     help="Hub id, local HF-format directory, or the alias smollm2-135m-instruct."),
        click.option("--profile", type=click.Choice(PROFILES), default=None,
                     help="quick (CPU-sized: subsampled, per-task limit) or full (all data). "
                          "Default: quick on CPU, full on GPU."),
        click.option("--mirror", type=click.Path(file_okay=False), default=None, envvar="HARNESS_MIRROR",
                     help="Local dataset mirror (<hub id>/<config>/<split>.jsonl). Env: HARNESS_MIRROR."),
        click.option("--suite", "suites", multiple=True, metavar="NAME|PATH",
                     help="Suite(s) measuring forgetting: tasks/suites/<NAME>.yaml or a path; repeatable (e.g. "
                          "--suite general --suite instruct). Default: the task file's suite:."),
        click.option("--run-id", default=None, help="Name of the run directory; re-using one resumes it."),
        click.option("--results-dir", type=click.Path(file_okay=False, path_type=Path),
                     default=PROJECT_ROOT / "results", show_default="results/", help="Where reports go."),
        click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=PROJECT_ROOT / "work",
                     show_default="work/", help="Where checkpoints and adapters go (git-ignored)."),
        click.option("--baselines-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                     envvar="HARNESS_BASELINES", show_default="baselines/",
                     help="Cache of base-model evaluations, reused when model, task and limits match. "
                          "Env: HARNESS_BASELINES."),
        click.option("--refresh-baseline", is_flag=True,
                     help="Evaluate the base again even when the baseline cache holds it (and update the cache)."),
        click.option("--jobs", default="auto", show_default=True, metavar="N|auto",
                     help="Arms and reference evaluations run at once, each in its own process. auto: on a GPU, as "
                          "many as its free memory holds (a small model leaves it mostly idle); 1 on CPU. Times "
                          "measured with several include their contention: --jobs 1 for isolated stage times."),
        *_context_options(include_path=True),
        click.option("--resume", "resume_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Resume RUN_DIR with its recorded settings: finished stages are reused, the rest redone."),
        click.argument("overrides", nargs=-1),
    ]
    return _with_options(options)(fn)


def _spec(methods, **kw):
    from harness.pipeline import CompareSpec

    kw.pop("resume_dir", None)
    kw["overrides"] = tuple(kw["overrides"])
    if kw["baselines_dir"] is None:
        del kw["baselines_dir"]
    kw["include_path"] = tuple(kw["include_path"])
    kw["suites"] = tuple(kw["suites"])
    return CompareSpec(methods=methods, **kw)


def _resumed(ctx: click.Context, run_dir: Path):
    """The spec and arms recorded in RUN_DIR/config.json; other options would change the run, so they are refused."""
    from harness import records
    from harness.pipeline import RESUMABLE, Arm, CompareSpec

    # What may run code (remote model code, pickled weights, task hooks) is never taken from a file in
    # the run directory: a copied or edited config.json must not grant it. It comes from this command line.
    trusted = ("trust_remote_code", "allow_pickle", "include_path")
    given = [p for p, v in ctx.params.items() if p not in ("resume_dir", "jobs", *trusted)
             and ctx.get_parameter_source(p) == click.core.ParameterSource.COMMANDLINE]
    if given or ctx.params.get("overrides"):
        raise HarnessError(f"--resume {run_dir}: takes the run's recorded settings; drop "
                           f"{', '.join('--' + g.replace('_', '-') for g in given) or 'the overrides'} "
                           "(or start a new run id)")
    path = run_dir / "config.json"
    if not path.exists():
        raise HarnessError(f"--resume {run_dir}: no config.json there (not a run directory, or it stopped before "
                           "its model was resolved: re-run the original command with --run-id)")
    config = records.read_run(path)
    recorded = config.spec
    if not isinstance(recorded, dict) or set(RESUMABLE) - set(recorded):
        raise HarnessError(f"{path}: no resumable settings recorded (written by an older harness); re-run the "
                           "original command with --run-id")
    import dataclasses

    known = {f.name for f in dataclasses.fields(CompareSpec)} - {"run_id", "results_dir", "jobs"}
    extra = sorted(set(recorded) - known)
    if extra:
        raise HarnessError(f"{path}: spec records unknown settings {', '.join(extra)} (written by another version "
                           "of the harness?); re-run the original command with --run-id")
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items() if k not in trusted}
    settings |= {"trust_remote_code": bool(ctx.params.get("trust_remote_code")),
                 "allow_pickle": bool(ctx.params.get("allow_pickle")),
                 "include_path": tuple(ctx.params.get("include_path") or ())}
    spec = CompareSpec(**settings, run_id=run_dir.resolve().name, results_dir=run_dir.resolve().parent.parent,
                       jobs=ctx.params.get("jobs", "auto"))  # how many at once does not change the run
    arms = [Arm(name, a["method"], tuple(a["overrides"])) for name, a in config.arms.items()]
    return spec, arms


@cli.command()
@click.option("--methods", default="full,qlora", show_default=True, callback=_methods,
              help=f"Comma-separated arms to train besides the base: {', '.join(METHODS)}.")
@run_options
def compare(methods, **kw):
    """Fine-tune one base with each method, evaluate base and arms, write a report.

    OVERRIDES are dotted task-config settings, e.g. training.epochs=2 methods.full.learning_rate=1e-5.

    Example:

        HARNESS_MIRROR=../shared/hf-mirror harness compare --task finance --methods full,qlora --profile quick
    """
    from harness.pipeline import compare as run_compare

    ctx = click.get_current_context()
    if kw["resume_dir"] is not None:
        spec, arms = _guard(_resumed, ctx, kw["resume_dir"])
        click.echo(_guard(run_compare, spec, arms) / "report.md")
        return
    click.echo(_guard(run_compare, _spec(methods, **kw)) / "report.md")


@cli.command()
@click.option("--methods", default="qlora", show_default=True, callback=_methods,
              help="Methods the grid is crossed with.")
@click.option("--grid", multiple=True, metavar="KEY=V1,V2",
              help="A task-config field and its values, e.g. lora.r=8,16,64; repeatable.")
@click.option("--grid-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="YAML with methods: [...] and grid: {key.path: [values]}.")
@run_options
def sweep(methods, grid, grid_file, **kw):
    """Train and evaluate one arm per grid point; plot learning against forgetting.

    Example:

        harness sweep --task finance --methods qlora,full --grid lora.r=8,16,64 --grid training.epochs=1,2
    """
    from harness.pipeline import compare as run_compare
    from harness.sweep import arms_from_grid, load_grid_file, parse_grid

    if kw["resume_dir"] is not None:  # the recorded arms are the grid points
        spec, arms = _guard(_resumed, click.get_current_context(), kw["resume_dir"])
        click.echo(_guard(run_compare, spec, arms) / "report.md")
        return

    def expand():
        f = load_grid_file(grid_file) if grid_file else None
        points = {**(f.grid if f else {}), **parse_grid(list(grid))}
        if not points and not (f and f.arms):
            raise HarnessError("sweep: give at least one --grid KEY=V1,V2 or a --grid-file")
        methods_ = list((f and f.methods) or methods)
        return arms_from_grid(methods_ if points else [], points, f.common if f else None, f.arms if f else ())

    arms = _guard(expand)
    click.echo(_guard(run_compare, _spec(tuple(a.method for a in arms), **kw), arms) / "report.md")


@cli.command()
@click.option("--arch", default="llama-2-7b", show_default=True,
              help="Preset (llama-2-7b, llama-2-13b, smollm2-135m, tiny-llama) or a config.json path.")
@click.option("--methods", default="full,lora,qlora", show_default=True, callback=_methods, help="Methods to profile.")
@click.option("--batch", default=1, show_default=True, type=int, help="Sequences per step.")
@click.option("--seq", default=512, show_default=True, type=int, help="Tokens per sequence.")
@click.option("--rank", default=16, show_default=True, type=int, help="LoRA rank.")
@click.option("--targets", default="q_proj,v_proj", show_default=True, help="LoRA target modules, or all-linear.")
@click.option("--steps", default=3, show_default=True, type=int, help="Optimizer steps (the first is warm-up).")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations in the backward pass.")
@click.option("--optimizer", type=click.Choice(["adamw", "paged_adamw_8bit"]), default="adamw", show_default=True)
@click.option("--precision", type=click.Choice(["bf16", "fp32-master"]), default="bf16", show_default=True,
              help="bf16 weights, or fp32 master weights with bf16 autocast.")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where profile.md/json go. Default: results/profile/<arch>-<device>.")
def profile(arch, methods, batch, seq, rank, targets, steps, gradient_checkpointing, optimizer, precision, out_dir):
    """Measure memory, speed, parameters and storage per method on a random-weight architecture.

    Example:

        harness profile --arch llama-2-7b --methods full,lora,qlora --batch 1 --seq 512 --rank 16 --targets q_proj,v_proj
    """
    from harness import models
    from harness.profile import run as run_profile

    name = Path(arch).parent.name if arch.endswith(".json") else arch
    out_dir = out_dir or PROJECT_ROOT / "results" / "profile" / f"{name}-{models.device_kind()}"
    target_list = [t.strip() for t in targets.split(",") if t.strip()]
    _guard(lambda: run_profile(arch=arch, methods=list(methods), batch=batch, seq=seq, rank=rank, targets=target_list,
                               steps=steps, gradient_checkpointing=gradient_checkpointing, optimizer=optimizer,
                               precision=precision, out_dir=out_dir))
    click.echo(out_dir / "profile.md")


@cli.command()
@click.argument("adapter_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the merged HF-format model (safetensors, tokenizer, merge.json).")
@click.option("--base", default=None, help="Base model. Default: the one the adapter records.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Dtype of the merged model. Default: bfloat16 on GPU, float32 on CPU.")
@click.option("--tolerance", type=float, default=None,
              help="Max logit difference allowed, relative to the largest logit. Default: per dtype.")
@_with_options(_context_options(include_path=False))
def merge(adapter_dir, out, base, dtype, tolerance, **loading):
    """Merge a LoRA/QLoRA adapter into its base and verify the logits; QLoRA merges into the 16-bit base.

    Example:

        harness merge work/finance/RUN/qlora/adapter --out work/finance/RUN/qlora/merged
    """
    from harness import context
    from harness.merge import run as run_merge

    def merged():
        with context.use(_context(**loading)):
            return run_merge(adapter_dir, out, base=base, dtype=dtype, tolerance=tolerance)

    rec = _guard(merged)
    v = rec["verification"]
    click.echo(f"merged {rec['method']} adapter into {rec['merged_into']}", err=True)
    click.echo(f"max |logit diff| vs base + adapter: {v['max_abs_diff_vs_base_plus_adapter']:.3g} "
               f"(tolerance {v['tolerance_abs']:.3g}); same top token at "
               f"{100 * v['top1_agreement_vs_base_plus_adapter']:.1f}% of positions", err=True)
    if "max_abs_diff_vs_4bit_base_plus_adapter" in v:
        click.echo(f"max |logit diff| vs the 4-bit base + adapter it was trained as (quantization gap): "
                   f"{v['max_abs_diff_vs_4bit_base_plus_adapter']:.3g}, mean "
                   f"{v['mean_abs_diff_vs_4bit_base_plus_adapter']:.3g}; same top token at "
                   f"{100 * v['top1_agreement_vs_4bit_base_plus_adapter']:.1f}%", err=True)
    click.echo(out)


@cli.command()
@click.argument("adapter_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--base", default=None, help="Base model. Default: the one the first adapter records.")
@click.option("--task", default="finance", show_default=True, help="Task whose in-domain lm-eval tasks are run.")
@click.option("--suite", is_flag=True, help="Also evaluate the task's suites (its suite: list), as compare does.")
@click.option("--profile", type=click.Choice(PROFILES), default=None,
              help="Document limits from the task's profiles. Default: quick on CPU, full on GPU.")
@click.option("--mirror", type=click.Path(file_okay=False), default=None, envvar="HARNESS_MIRROR",
              help="Local dataset mirror. Env: HARNESS_MIRROR.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where adapters.json and adapters.md go.")
@_with_options(_context_options(include_path=True))
def adapters(adapter_dirs, base, task, suite, profile, mirror, out, **loading):
    """Evaluate several adapters on one loaded base, switching between them; timed.

    Example:

        harness adapters work/finance/RUN/lora/adapter work/finance/RUN/qlora/adapter --out results/adapters
    """
    from harness import context
    from harness.adapters import run as run_adapters

    def evaluated():
        with context.use(_context(**loading)):
            return run_adapters(base=base, adapters=list(adapter_dirs), task=task, suite=suite, profile=profile,
                                mirror=mirror, out=out)

    _guard(evaluated)
    click.echo(out / "adapters.md")


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def report(run_dir):
    """Regenerate a run's tables and plots from its stored artifacts (no model needed).

    Example:

        harness report results/finance/20261128-120000-quick
    """
    from harness.report import run as run_report

    click.echo(_guard(run_report, run_dir))


def _guard(fn, *args):
    try:
        return fn(*args)
    except HarnessError as e:
        raise UserError(str(e)) from None
    except FileNotFoundError as e:
        raise UserError(str(e)) from None


def main():
    # Evaluation batches vary in shape; with fixed segments the CUDA allocator kept ~135 GiB reserved
    # for ~10 GiB allocated on an H200. Growable segments reuse memory instead. Set before CUDA starts;
    # a user's own setting wins.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    cli(prog_name="harness")


if __name__ == "__main__":
    sys.exit(main())
