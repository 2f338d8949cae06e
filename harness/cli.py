"""The `harness` command: thin click wrappers over the pipeline stages."""

from __future__ import annotations

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


@cli.command()
@click.option("--task", default="finance", show_default=True, help="Task file: tasks/<TASK>.yaml, or a path.")
@click.option("--model", default="smollm2-135m-instruct", show_default=True,
              help="Hub id, local HF-format directory, or the alias smollm2-135m-instruct.")
@click.option("--methods", default="full,qlora", show_default=True, callback=_methods,
              help=f"Comma-separated arms to train besides the base: {', '.join(METHODS)}.")
@click.option("--profile", type=click.Choice(PROFILES), default=None,
              help="quick (CPU-sized: subsampled, per-task limit) or full (all data). Default: quick on CPU, full on GPU.")
@click.option("--mirror", type=click.Path(file_okay=False), default=None, envvar="HARNESS_MIRROR",
              help="Local dataset mirror (<hub id>/<config>/<split>.jsonl). Env: HARNESS_MIRROR.")
@click.option("--run-id", default=None, help="Name of the run directory; re-using one resumes it.")
@click.option("--results-dir", type=click.Path(file_okay=False, path_type=Path), default=PROJECT_ROOT / "results",
              show_default="results/", help="Where reports go.")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=PROJECT_ROOT / "work",
              show_default="work/", help="Where checkpoints and adapters go (git-ignored).")
@click.argument("overrides", nargs=-1)
def compare(task, model, methods, profile, mirror, run_id, results_dir, work_dir, overrides):
    """Fine-tune one base with each method, evaluate base and arms, write a report.

    OVERRIDES are dotted task-config settings, e.g. training.epochs=2 methods.full.learning_rate=1e-5.

    Example:

        HARNESS_MIRROR=../shared/hf-mirror harness compare --task finance --methods full,qlora --profile quick
    """
    from harness.pipeline import CompareSpec, compare as run_compare

    spec = CompareSpec(task=task, model=model, methods=methods, profile=profile, mirror=mirror, run_id=run_id,
                       results_dir=results_dir, work_dir=work_dir, overrides=tuple(overrides))
    run_dir = _guard(run_compare, spec)
    click.echo(run_dir / "report.md")


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
    cli(prog_name="harness")


if __name__ == "__main__":
    sys.exit(main())
