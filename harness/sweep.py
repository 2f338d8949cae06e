"""Sweep grids: task-config fields and their values, expanded into arms (one per grid point).

    harness sweep --task finance --methods qlora --grid lora.r=8,16,64 --grid methods.qlora.learning_rate=1e-4,2e-4

Every grid point is an arm of one compare run: trained once, evaluated once, recorded in the run
directory (a re-run skips recorded points), and placed on the learning-forgetting plot.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import yaml

from harness.config import METHODS, HarnessError, read_yaml
from harness.pipeline import Arm


def parse_grid(items: list[str]) -> dict[str, list]:
    """["lora.r=8,16"] -> {"lora.r": [8, 16]} (values parsed as YAML scalars)."""
    grid: dict[str, list] = {}
    for item in items:
        if "=" not in item:
            raise HarnessError(f"--grid {item!r}: expected key.path=value1,value2,...")
        key, raw = item.split("=", 1)
        values = [yaml.safe_load(v) for v in raw.split(",") if v.strip()]
        if not values:
            raise HarnessError(f"--grid {item!r}: no values")
        grid[key.strip()] = values
    return grid


def load_grid_file(path: Path) -> tuple[list[str], dict[str, list]]:
    """A YAML file: {methods: [qlora, ...], grid: {key.path: [values...]}}."""
    data = read_yaml(path)
    unknown = set(data) - {"methods", "grid"}
    if unknown:
        raise HarnessError(f"{path}: unknown key '{sorted(unknown)[0]}' (valid: methods, grid)")
    methods = data.get("methods") or []
    grid = data.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise HarnessError(f"{path}: grid must map each key.path to a non-empty list of values")
    return list(methods), {str(k): v for k, v in grid.items()}


def _applies(key: str, method: str) -> bool:
    """Whether a grid key changes anything for a method (LoRA rank means nothing to full FT)."""
    if key.startswith("lora."):
        return method in ("lora", "qlora")
    if key.startswith("quant."):
        return method == "qlora"
    if key.startswith("methods."):
        return key.split(".")[1] == method
    if key == "mitigation.l2_to_base":  # a pull toward the base weights: full fine-tuning's
        return method == "full"
    return True


def _label(value) -> str:
    return format(value, "g") if isinstance(value, float) else str(value)


def arms_from_grid(methods: list[str], grid: dict[str, list]) -> list[Arm]:
    for m in methods:
        if m not in METHODS:
            raise HarnessError(f"sweep: unknown method '{m}'; valid: {', '.join(METHODS)}")
    arms: dict[str, Arm] = {}
    for method in methods:
        keys = [k for k in grid if _applies(k, method)]
        for values in itertools.product(*(grid[k] for k in keys)):
            overrides = tuple(f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                              for k, v in zip(keys, values))
            name = "_".join([method, *(f"{k.split('.')[-1]}={_label(v)}" for k, v in zip(keys, values))])
            arms.setdefault(name, Arm(name, method, overrides))
    if not arms:
        raise HarnessError("sweep: the grid expands to no arm")
    return list(arms.values())
