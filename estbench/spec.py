"""Matrix specs: TOML files expanded into independent cells (task x estimator x seed).

Any list-valued parameter of a ``[[task]]`` or ``[[estimator]]`` table expands into a grid
(``temperature = [0.1, 0.5]`` gives two configurations); for a parameter whose value is itself a
list, a list of lists is the grid. Everything is validated before anything runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from estbench.errors import SpecError, did_you_mean
from estbench.gradients import METHODS
from estbench.registry import ESTIMATORS, TASKS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["Measure", "Cell", "Spec", "load_spec", "parse_spec"]

OPTIMIZERS = ("adam", "sgd", "rmsprop")
DEVICES = ("cpu", "cuda")
TOP_LEVEL_KEYS = ("name", "seeds", "device", "measure", "task", "estimator")


@dataclass(frozen=True)
class Measure:
    """What each cell measures and how it trains."""

    gradient_samples: int = 1000
    checkpoints: tuple[int, ...] = (0,)
    steps: int = 0
    optimizer: str = "adam"
    lr: float = 0.01
    log_every: int = 10
    gradient_method: str = "auto"
    gradient_chunk: int = 0
    reference_estimator: str = "rloo"
    reference_samples: int = 0
    ema_decay: float = 0.999
    eval_every: int = 0
    throughput: bool = True
    throughput_min_time: float = 0.2
    threads: int = 1
    time_limit_s: float = 0.0
    memory_budget_mb: float = 0
    #: save the cell's whole state every N training steps (0: only when SIGTERM / SIGINT stops
    #: it). 1,000 bounds what a SIGKILL loses to seconds of a VAE (8-40 ms a step on two cores)
    #: while a save (33 MB, 0.06-0.08 s for the 20x10 categorical VAE) costs about 1% of them.
    checkpoint_every: int = 1000

    def identity(self) -> dict[str, Any]:
        """The fields that can change a cell's numbers (all but :data:`NOT_IN_IDENTITY`)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in NOT_IN_IDENTITY}


#: [measure] keys that never change a cell's numbers (the memory budget changes only how draws
#: are grouped into chunks, not their distribution): changing them keeps the cell ids, so a run
#: may be resumed with another time limit, checkpoint interval or memory budget
NOT_IN_IDENTITY = ("time_limit_s", "checkpoint_every", "memory_budget_mb")


@dataclass(frozen=True)
class Cell:
    """One independent unit of work: a task config, an estimator config and a seed, measured
    with ``measure`` on ``device``."""

    task: str
    task_params: dict[str, Any]
    estimator: str
    estimator_params: dict[str, Any]
    seed: int
    measure: Measure = Measure()
    device: str = "cpu"

    @property
    def id(self) -> str:
        """``task__estimator__s<seed>__<digest>``; the digest covers everything that changes the
        cell's numbers: task and its params, estimator and its params, seed, the [measure] table
        (:meth:`Measure.identity`) and the device."""
        key = json.dumps(
            [self.task, self.task_params, self.estimator, self.estimator_params, self.seed,
             self.measure.identity(), self.device],
            sort_keys=True,
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:10]
        return f"{self.task}__{self.estimator}__s{self.seed}__{digest}"


@dataclass(frozen=True)
class Spec:
    name: str
    seeds: tuple[int, ...]
    device: str
    measure: Measure
    tasks: tuple[tuple[str, dict[str, Any]], ...]
    estimators: tuple[tuple[str, dict[str, Any]], ...]
    source: str = field(default="", compare=False)

    def cells(self, device: str | None = None) -> list[Cell]:
        """Every (task config, estimator config, seed), tasks outermost, on ``device`` (default:
        the spec's)."""
        device = device or self.device
        return [
            Cell(t, tp, e, ep, seed, self.measure, device)
            for (t, tp), (e, ep), seed in itertools.product(self.tasks, self.estimators, self.seeds)
        ]

    def hash(self) -> str:
        """Hash of the resolved spec (not its formatting)."""
        payload = json.dumps(
            [self.name, self.seeds, self.device, dataclasses.asdict(self.measure),
             self.tasks, self.estimators],
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()


def _type_error(where: str, key: str, want: str, value: Any) -> SpecError:
    return SpecError(f"{where}: '{key}' must be {want}, got {value!r}")


def _parse_measure(table: Any) -> Measure:
    if not isinstance(table, dict):
        raise _type_error("spec", "measure", "a table ([measure])", table)
    known = [f.name for f in dataclasses.fields(Measure)]
    for key in table:
        if key not in known:
            raise SpecError(
                f"unknown key '{key}' in [measure].{did_you_mean(key, known)} "
                f"Known keys: {', '.join(known)}"
            )
    values = dict(table)
    ints = ("gradient_samples", "steps", "log_every", "gradient_chunk", "reference_samples",
            "eval_every", "checkpoint_every")
    for key in ints:
        if key in values and (isinstance(values[key], bool) or not isinstance(values[key], int)):
            raise _type_error("[measure]", key, "an integer", values[key])
    if "threads" in values and (isinstance(values["threads"], bool)
                                or not isinstance(values["threads"], int) or values["threads"] < 1):
        raise _type_error("[measure]", "threads", "an integer >= 1 (torch threads per cell)",
                          values["threads"])
    if "time_limit_s" in values:
        v = values["time_limit_s"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise _type_error("[measure]", "time_limit_s", "a number of seconds >= 0 (0: none)", v)
        values["time_limit_s"] = float(v)
    for key in ("lr", "throughput_min_time"):
        if key in values:
            v = values[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise _type_error("[measure]", key, "a positive number", v)
            values[key] = float(v)
    if "memory_budget_mb" in values:
        v = values["memory_budget_mb"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise _type_error("[measure]", "memory_budget_mb",
                              "a number of MB >= 0 (0: a quarter of the free memory)", v)
        values["memory_budget_mb"] = float(v)
    if "throughput" in values and not isinstance(values["throughput"], bool):
        raise _type_error("[measure]", "throughput", "true or false", values["throughput"])
    if "checkpoints" in values:
        cps = values["checkpoints"]
        if not isinstance(cps, list) or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in cps
        ):
            raise _type_error("[measure]", "checkpoints", "a list of steps >= 0", cps)
        values["checkpoints"] = tuple(sorted(set(cps)))
    if "ema_decay" in values:
        v = values["ema_decay"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise _type_error("[measure]", "ema_decay", "a number in [0, 1)", v)
        values["ema_decay"] = float(v)
    measure = Measure(**values)
    if measure.reference_samples < 0 or measure.eval_every < 0:
        raise _type_error("[measure]", "reference_samples / eval_every", "integers >= 0",
                          (measure.reference_samples, measure.eval_every))
    reference = ESTIMATORS.get(measure.reference_estimator)
    if not reference.unbiased:
        raise SpecError(
            f"[measure]: reference_estimator must be unbiased, '{measure.reference_estimator}' "
            f"is not; use e.g. rloo or reinforce"
        )
    if measure.checkpoint_every < 0:
        raise _type_error("[measure]", "checkpoint_every",
                          "an integer >= 0 (steps between saves; 0: only on SIGTERM / SIGINT)",
                          measure.checkpoint_every)
    if measure.gradient_samples < 2:
        raise _type_error("[measure]", "gradient_samples", "an integer >= 2", measure.gradient_samples)
    if measure.steps < 0:
        raise _type_error("[measure]", "steps", "an integer >= 0", measure.steps)
    if measure.log_every < 1:
        raise _type_error("[measure]", "log_every", "an integer >= 1", measure.log_every)
    if measure.gradient_chunk < 0:
        raise _type_error("[measure]", "gradient_chunk", "an integer >= 0 (0: automatic)",
                          measure.gradient_chunk)
    if measure.optimizer not in OPTIMIZERS:
        raise SpecError(
            f"[measure]: optimizer must be one of {', '.join(OPTIMIZERS)}, got "
            f"{measure.optimizer!r}.{did_you_mean(str(measure.optimizer), OPTIMIZERS)}"
        )
    if measure.gradient_method not in METHODS:
        raise _type_error("[measure]", "gradient_method", f"one of {METHODS}", measure.gradient_method)
    late = [c for c in measure.checkpoints if c > measure.steps]
    if late:
        raise SpecError(
            f"[measure]: checkpoints {late} lie beyond steps = {measure.steps}; "
            f"raise steps or drop those checkpoints"
        )
    return measure


def _expand(kind: str, table: Any, registry, index: int) -> list[tuple[str, dict[str, Any]]]:
    where = f"[[{kind}]] #{index + 1}"
    if not isinstance(table, dict):
        raise SpecError(f"{where} must be a table, got {table!r}")
    if "name" not in table:
        raise SpecError(f"{where} has no 'name'; add name = \"...\" (see `estbench list {kind}s`)")
    name = table["name"]
    if not isinstance(name, str):
        raise _type_error(where, "name", "a string", name)
    cls = registry.get(name)
    sequence_fields = cls.sequence_fields()
    axes: list[list[tuple[str, Any]]] = []
    for key, value in table.items():
        if key == "name":
            continue
        is_grid = isinstance(value, list) and (
            key not in sequence_fields or (value and all(isinstance(v, list) for v in value))
        )
        if is_grid and not value:
            raise SpecError(f"{where} ({name}): '{key}' is an empty list; give at least one value")
        axes.append([(key, v) for v in value] if is_grid else [(key, value)])
    configs = []
    for combo in itertools.product(*axes):
        params = dict(combo)
        instance = cls.from_params(params)  # validates; raises a one-line error
        configs.append((name, instance.params()))
    return configs


def parse_spec(data: dict[str, Any], source: str = "<spec>") -> Spec:
    """Validate a parsed TOML document and resolve it into a :class:`Spec`."""
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise SpecError(
                f"unknown top-level key '{key}' in {source}.{did_you_mean(key, TOP_LEVEL_KEYS)} "
                f"Known keys: {', '.join(TOP_LEVEL_KEYS)}"
            )
    name = data.get("name")
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise SpecError(f"{source}: 'name' must be a non-empty string without '/', got {name!r}")
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds
    ):
        raise _type_error(source, "seeds", "a non-empty list of integers >= 0", seeds)
    device = data.get("device", "cpu")
    if device not in DEVICES:
        raise _type_error(source, "device", f"one of {', '.join(DEVICES)}", device)
    measure = _parse_measure(data.get("measure", {}))
    tasks_tables = data.get("task")
    estimator_tables = data.get("estimator")
    if not isinstance(tasks_tables, list) or not tasks_tables:
        raise SpecError(f"{source}: no [[task]] tables; add at least one (see `estbench list tasks`)")
    if not isinstance(estimator_tables, list) or not estimator_tables:
        raise SpecError(
            f"{source}: no [[estimator]] tables; add at least one (see `estbench list estimators`)"
        )
    tasks = [c for i, t in enumerate(tasks_tables) for c in _expand("task", t, TASKS, i)]
    estimators = [
        c for i, e in enumerate(estimator_tables) for c in _expand("estimator", e, ESTIMATORS, i)
    ]
    for task_name, task_params in tasks:
        latent = TASKS.get(task_name).from_params(task_params).latent
        for est_name, est_params in estimators:
            estimator = ESTIMATORS.get(est_name).from_params(est_params)
            if latent.kind in estimator.supports:
                estimator.check_latent(latent)
    return Spec(
        name=name,
        seeds=tuple(dict.fromkeys(seeds)),
        device=device,
        measure=measure,
        tasks=tuple(dict.fromkeys((n, _FrozenDict(p)) for n, p in tasks)),
        estimators=tuple(dict.fromkeys((n, _FrozenDict(p)) for n, p in estimators)),
        source=source,
    )


class _FrozenDict(dict):
    """A dict usable as a de-duplication key (params never change after parsing)."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(json.dumps(self, sort_keys=True))


def load_spec(path: str | Path) -> Spec:
    """Read and validate a TOML spec file."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file '{path}' does not exist; pass the path to a .toml spec "
                        f"(e.g. runs/quick.toml)")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise SpecError(f"spec file '{path}' is not valid TOML: {err}") from None
    return parse_spec(data, source=str(path))
