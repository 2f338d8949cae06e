"""Sweep grids: task-config fields and their values, expanded into arms (one per grid point).

    harness sweep --task finance --methods qlora --grid lora.r=8,16,64 --grid methods.qlora.learning_rate=1e-4,2e-4

Every grid point is an arm of one compare run: trained once, evaluated once, recorded in the run
directory (a re-run skips recorded points), and placed on the learning-forgetting plot.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import yaml

from harness.config import METHODS, HarnessError, read_yaml
from harness.planning import Arm


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


@dataclass(frozen=True)
class GridFile:
    """A study as a file (tasks/sweeps/<name>.yaml):

        methods: [full, lora, qlora]
        grid: {key.path: [values...]}          crossed per method (only the keys a method uses)
        set: {key.path: value}                 applied to every grid arm
        arms:                                  more arms, each named, e.g. a mitigation at one grid point
          - {name: full-frozen, method: full, set: {methods.full.learning_rate: 5.0e-4, mitigation.freeze_layers: 10}}
          - {name: full_learning_rate=0.0005, method: full, set: {mitigation.interpolate: [0.5]}}
                                               (a grid point's own name: settings added to that point)
    """

    methods: list[str]
    grid: dict[str, list]
    common: dict[str, object]
    arms: list[Arm]


def _override(key: str, value) -> str:
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


def load_grid_file(path: Path) -> GridFile:
    data = read_yaml(path)
    unknown = set(data) - {"methods", "grid", "set", "arms"}
    if unknown:
        raise HarnessError(f"{path}: unknown key '{sorted(unknown)[0]}' (valid: methods, grid, set, arms)")
    methods = data.get("methods") or []
    grid = data.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise HarnessError(f"{path}: grid must map each key.path to a non-empty list of values")
    common = data.get("set") or {}
    if not isinstance(common, dict):
        raise HarnessError(f"{path}: set must map each key.path to one value")
    arms = []
    for i, a in enumerate(data.get("arms") or []):
        where = f"{path}: arms[{i}]"
        if not isinstance(a, dict) or set(a) - {"name", "method", "set"} or not {"name", "method"} <= set(a):
            raise HarnessError(f"{where}: expected {{name, method, set}}, got {a!r}")
        if a["method"] not in METHODS:
            raise HarnessError(f"{where}: unknown method '{a['method']}'; valid: {', '.join(METHODS)}")
        extra = a.get("set") or {}
        if not isinstance(extra, dict):
            raise HarnessError(f"{where}: set must map each key.path to one value")
        arms.append(Arm(str(a["name"]), a["method"], tuple(_override(k, v) for k, v in {**common, **extra}.items())))
    return GridFile(list(methods), {str(k): v for k, v in grid.items()}, {str(k): v for k, v in common.items()}, arms)


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


def arms_from_grid(methods: list[str], grid: dict[str, list], common: dict | None = None,
                   extra: list[Arm] = ()) -> list[Arm]:
    for m in methods:
        if m not in METHODS:
            raise HarnessError(f"sweep: unknown method '{m}'; valid: {', '.join(METHODS)}")
    arms: dict[str, Arm] = {}
    for method in methods:
        keys = [k for k in grid if _applies(k, method)]
        for values in itertools.product(*(grid[k] for k in keys)):
            overrides = tuple(_override(k, v) for k, v in {**(common or {}), **dict(zip(keys, values))}.items())
            name = "_".join([method, *(f"{k.split('.')[-1]}={_label(v)}" for k, v in zip(keys, values))])
            arms.setdefault(name, Arm(name, method, overrides))
    for arm in extra:
        if arm.name in arms:  # a grid point's name: its settings extended (e.g. points to evaluate), not a new arm
            point = arms[arm.name]
            if point.method != arm.method:
                raise HarnessError(f"sweep: arm '{arm.name}' is a grid point of method {point.method}, not {arm.method}")
            keys = {o.split("=", 1)[0] for o in arm.overrides}
            arms[arm.name] = Arm(arm.name, arm.method, tuple(o for o in point.overrides if o.split("=", 1)[0] not in keys)
                                 + arm.overrides)
        else:
            arms[arm.name] = arm
    if not arms:
        raise HarnessError("sweep: the grid expands to no arm")
    return list(arms.values())
