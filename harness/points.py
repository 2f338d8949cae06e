"""Points: more models from one trained arm, each evaluated like an arm and recorded beside it.

    training.eval_at: [0.25, 0.5]        <arm>_at=0.25, <arm>_at=0.5: its weights at those fractions of
                                         its steps (snapshots saved while it trains): forgetting curves
    mitigation.interpolate: [0.25, 0.5]  <arm>_alpha=0.25, ...: theta_0 + alpha (theta - theta_0) for full
                                         fine-tuning, the adapter scaled by alpha for LoRA/QLoRA (WiSE-FT,
                                         Wortsman et al. 2022), with no retraining

A point's record is an arm record whose `train` is None and whose `point` names the arm it comes from;
its inputs hash is the arm's plus its own kind and value, so a point is redone exactly when its arm is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness import models

SNAPSHOTS = "at"  # <arm work dir>/at/<fraction>/: the arm's weights (or adapter) at that fraction of its steps


@dataclass(frozen=True)
class Point:
    name: str
    arm: str
    method: str
    kind: str  # "at" (a snapshot during training) | "alpha" (weights interpolated toward the start)
    value: float

    def record(self) -> dict:
        return {"of": self.arm, "method": self.method, "kind": self.kind, "value": self.value}


def _label(x: float) -> str:
    return format(x, "g")


def of(arm: str, method: str, task) -> list[Point]:
    """The points an arm's settings ask for: snapshots (1.0 is the arm itself) then interpolations."""
    out = [Point(f"{arm}_at={_label(f)}", arm, method, "at", float(f)) for f in sorted(task.training.eval_at) if f < 1]
    out += [Point(f"{arm}_alpha={_label(a)}", arm, method, "alpha", float(a)) for a in sorted(task.mitigation.interpolate)
            if a < 1]
    return out


def snapshot_steps(fractions: list[float], max_steps: int) -> dict[int, list[float]]:
    """Optimizer step -> the fractions saved after it (at least step 1; several fractions may share one)."""
    steps: dict[int, list[float]] = {}
    for f in fractions:
        if f < 1:
            steps.setdefault(max(1, round(f * max_steps)), []).append(float(f))
    return steps


def snapshot_dir(arm_dir: Path, fraction: float) -> Path:
    return arm_dir / SNAPSHOTS / _label(fraction)


def load_snapshot(point: Point, arm_dir: Path, base_path: str, *, quant: dict):
    saved = snapshot_dir(arm_dir, point.value)
    if not (saved / "harness_arm.json").exists():
        raise FileNotFoundError(f"{saved}: the snapshot of {point.arm} at {point.value:g} of its steps is missing")
    return models.load_arm(point.method, base_path, saved, quant=quant)


def _is_adapter_b(name: str) -> bool:
    # LoRA's update is scaling x B(A x) (+ B's bias): scaling B by alpha scales the update by alpha exactly.
    return ".lora_B." in name or ".lora_embedding_B." in name


class Interpolation:
    """A trained arm's weights moved along the line to its starting point, in place, one alpha at a time.

    Full fine-tuning: torch.lerp(theta_0, theta, alpha), which returns theta_0 at alpha 0 and theta at
    alpha 1 bit for bit (lerp computes from the nearer end). LoRA/QLoRA: lora_B x alpha (exact at 0 and
    1); the start is then the base the adapter sits on (the 4-bit base for QLoRA)."""

    def __init__(self, model, method: str, base_path: str):
        import torch

        self.model, self.method = model, method
        params = dict(model.named_parameters())
        if method == "full":
            base = models.load_base(base_path, dtype=next(iter(params.values())).dtype)
            start = dict(base.named_parameters())
            missing = sorted(set(params) ^ set(start))
            if missing:
                raise ValueError(f"interpolation: the base and the arm differ in parameter {missing[0]}")
            self.start = {n: start[n].detach().to(params[n].device) for n in params}
            del base
        else:
            self.start = None
            if not any(_is_adapter_b(n) for n in params):
                raise ValueError("interpolation: the arm has no LoRA B matrices to scale")
        with torch.no_grad():
            self.end = {n: p.detach().clone() for n, p in params.items() if method == "full" or _is_adapter_b(n)}

    def set(self, alpha: float) -> None:
        import torch

        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if n not in self.end:
                    continue
                if self.start is not None:
                    p.copy_(torch.lerp(self.start[n], self.end[n], alpha))
                else:
                    p.copy_(self.end[n] * alpha)
