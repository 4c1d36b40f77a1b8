"""One cell: train the task's parameters with the estimator and measure along the way.

A cell records, in one long-form frame: gradient quality at the checkpoints (phase
``gradient``); along training (phase ``train``) the discrete loss ``loss`` (f at hard samples
z ~ p_theta), the estimator's own ``loss_estimator``, the trajectory variance and the training
wall-clock; everything the task's ``evaluate`` returns (phase ``eval``: ``loss_exact``, the VAE
bounds); and the cost of an estimate (phase ``throughput``). A cell can save its whole state to
a checkpoint file and resume from it (:func:`run_cell`). :mod:`estbench.run` runs many cells
into a run directory; this module knows nothing of run directories, executors or locks.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from estbench.checkpoint import (
    CheckpointWarning,
    load_checkpoint,
    restore_rng_states,
    rng_states,
    save_checkpoint,
)
from estbench.checkpoint import identity as checkpoint_identity
from estbench.contracts import Estimator, Params, Task
from estbench.errors import EstbenchError
from estbench.gradients import (
    flatten_gradients,
    group_indices,
    reference_gradient,
    reference_logits_gradient,
    stream_draws,
)
from estbench.interruption import StopOnSignals
from estbench.latents import Latent, one_hot
from estbench.memory import budget_bytes, headroom_bytes, memory_budget
from estbench.metrics import MetricValue, StreamingGradientMetrics, gradient_metrics, value_scale
from estbench.registry import ESTIMATORS, TASKS
from estbench.spec import Cell, Measure
from estbench.store import to_rows
from estbench.throughput import measure_throughput

__all__ = ["run_cell", "cell_frame", "build", "hard_sample", "CellSkipped", "CellInterrupted",
           "NonFiniteError", "TrajectoryVariance"]


class CellSkipped(Exception):
    """The estimator cannot run on the task's latent kind (recorded as a skip, not a failure)."""


class NonFiniteError(RuntimeError):
    """A loss or gradient estimate was NaN or infinite."""


def _optimizer(name: str, params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)
    return torch.optim.SGD(params, lr=lr)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _records(phase: str, step: int, values: list[MetricValue]) -> list[dict[str, Any]]:
    return [
        {"phase": phase, "step": step, "metric": v.metric, "value": float(v.value),
         "ci_low": _optional_float(v.ci_low), "ci_high": _optional_float(v.ci_high)}
        for v in values
    ]


def build(cell: Cell) -> tuple[Task, Estimator]:
    """Instantiate the cell's task and estimator (raises :class:`CellSkipped` if incompatible)."""
    task = TASKS.get(cell.task).from_params(cell.task_params)
    estimator = ESTIMATORS.get(cell.estimator).from_params(cell.estimator_params)
    if task.latent.kind not in estimator.supports:
        raise CellSkipped(
            f"estimator '{cell.estimator}' does not support {task.latent.kind} latents"
        )
    estimator.check_latent(task.latent)
    return task, estimator


#: above this many stored values (M x P), gradient metrics are streamed instead of exact (the
#: exact ones cost M^2 P for tr(Sigma^2)); below it they are streamed when the budget is short
EXACT_METRICS_MAX_VALUES = 50_000_000
#: bytes per stored value of the exact metrics: float32 draws, float64 copy, centred, squares
EXACT_BYTES_PER_VALUE = 4 + 3 * 8
#: bytes per value of a streamed chunk: a group's float32 copy, then float64 copy, squares,
#: errors from the reference and their squares, pair differences
STREAM_BYTES_PER_VALUE = 4 + 5 * 8


def _moments(task: Task, estimator: Estimator, params: Params, batch: Any, count: int,
             measure: Measure) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Mean and variance-of-the-mean of ``count`` draws (parameters, then logits), streamed.
    A deterministic estimator's mean is its one draw, with variance 0."""
    if estimator.deterministic:
        grads, logit_grads = next(stream_draws(task, estimator, params, batch, 1))
        zero, logit_zero = torch.zeros_like(grads[0]), torch.zeros_like(logit_grads[0])
        return grads[0], zero, logit_grads[0], logit_zero
    stats, logit_stats = StreamingGradientMetrics(None), StreamingGradientMetrics(None)
    size = sum(p.numel() for p in params.values()) + _logits_size(task, params, batch)
    for grads, logit_grads in stream_draws(task, estimator, params, batch, count,
                                           chunk_size=measure.gradient_chunk or None,
                                           per_draw_bytes=STREAM_BYTES_PER_VALUE * size):
        stats.add(grads)
        logit_stats.add(logit_grads)
    return (*stats.moments(), *logit_stats.moments())


def _logits_size(task: Task, params: Params, batch: Any) -> int:
    with torch.no_grad():
        return task.logits({n: p.detach() for n, p in params.items()}, batch).numel()


def _reference(task: Task, params: Params, batch: Any, measure: Measure,
               ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """(g*, its variance, g*_logits, its variance): exact where the task has it (enumeration in
    chunks within the budget), else the mean of ``reference_samples`` draws of an unbiased
    estimator (variance = per-coordinate SE^2)."""
    exact = reference_gradient(task, params, batch)
    exact_logits = reference_logits_gradient(task, params, batch) if task.logits_metrics else None
    if exact is not None:
        return exact, None, exact_logits, None
    count = measure.reference_samples or 10 * measure.gradient_samples
    estimator = ESTIMATORS.get(measure.reference_estimator)()
    mean, var, logit_mean, logit_var = _moments(task, estimator, params, batch, count, measure)
    if exact_logits is not None:
        logit_mean, logit_var = exact_logits, None
    return mean, var, logit_mean, logit_var


def _prefixed(prefix: str, values: list[MetricValue]) -> list[MetricValue]:
    return [v._replace(metric=prefix + v.metric) for v in values]


def _subset(x: Tensor | None, index: Tensor | None) -> Tensor | None:
    """The coordinates ``index`` of ``x`` (all of them when ``index`` is None)."""
    return x if x is None or index is None else x[..., index]


def _gradient_phase(
    task: Task, estimator: Estimator, params: Params, measure: Measure,
    generator: torch.Generator, step: int,
) -> list[dict[str, Any]]:
    """Gradient quality at fixed parameters for all parameters, each parameter group and (where
    the task asks) the logits, within the memory budget (``measure.memory_budget_mb``; on CPU
    the process's resident set, see :func:`estbench.memory.headroom_bytes`): exact
    metrics from stored draws when they are small, streamed statistics otherwise. A
    deterministic estimator is drawn once; its metrics are those of M identical draws (zero
    variance), which two identical rows give exactly."""
    device = next(iter(params.values())).device
    headroom = headroom_bytes(budget_bytes(measure.memory_budget_mb, device), device)
    with memory_budget(headroom):
        return _measure_gradients(task, estimator, params, measure, generator, step, headroom)


def _measure_gradients(
    task: Task, estimator: Estimator, params: Params, measure: Measure,
    generator: torch.Generator, step: int, budget: int,
) -> list[dict[str, Any]]:
    batch = task.gradient_batch(generator)
    reference, reference_var, logit_ref, logit_ref_var = _reference(task, params, batch, measure)
    # view key -> (coordinates of the parameter gradient or None for all, is it the logits view)
    views: dict[str, tuple[Tensor | None, bool]] = {"": (None, False)}
    for group, index in group_indices(params, task.parameter_groups()).items():
        views[f"{group}/"] = (index, False)
    if task.logits_metrics:
        views["logits/"] = (None, True)
    refs = {key: (logit_ref, logit_ref_var) if is_logits
            else (_subset(reference, index), _subset(reference_var, index))
            for key, (index, is_logits) in views.items()}
    total = sum(p.numel() for p in params.values())
    sizes = {key: (_logits_size(task, params, batch) if is_logits
                   else total if index is None else index.numel())
             for key, (index, is_logits) in views.items()}
    values_per_draw = sum(sizes.values())
    count = 2 if estimator.deterministic else measure.gradient_samples
    stored_bytes = count * values_per_draw * EXACT_BYTES_PER_VALUE
    exact = (count * total <= EXACT_METRICS_MAX_VALUES and stored_bytes <= budget // 2)
    per_draw = 4 * values_per_draw if exact else STREAM_BYTES_PER_VALUE * values_per_draw
    draw_budget = budget - (stored_bytes if exact else 4 * 8 * values_per_draw)
    stored: dict[str, list[Tensor]] = {key: [] for key in views}
    streams = {} if exact else {key: StreamingGradientMetrics(refs[key][0]) for key in views}
    for grads, logit_grads in stream_draws(
            task, estimator, params, batch, count, method=measure.gradient_method,
            chunk_size=measure.gradient_chunk or None, budget=draw_budget,
            per_draw_bytes=per_draw):
        if not torch.isfinite(grads).all():
            raise NonFiniteError(f"non-finite gradient estimate at step {step}")
        for key, (index, is_logits) in views.items():
            part = logit_grads if is_logits else _subset(grads, index)
            if exact:
                stored[key].append(part)
            else:
                streams[key].add(part)
    values: list[MetricValue] = []
    scale = value_scale(task.latent, task.logits(params, batch), task.cost(params, batch))
    for key in views:
        ref, ref_var = refs[key]
        if exact:
            metrics = gradient_metrics(torch.cat(stored[key]), ref, ref_var, scale=scale,
                                       deterministic=estimator.deterministic)
        else:
            metrics = streams[key].metrics(ref_var, scale=scale,
                                           deterministic=estimator.deterministic)
        values += _prefixed(key, metrics)
    if reference_var is not None:
        values.append(MetricValue("grad_ref_se_norm", float(reference_var.sum().sqrt())))
    return _records("gradient", step, values)


class TrajectoryVariance:
    """Exponential moving averages (decay beta, bias-corrected) of the training gradient g and
    of g^2, per coordinate: the variance along training used by REBAR and DisARM, reported as
    the mean over coordinates of E[g^2] - E[g]^2."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.steps = 0
        self.mean: Tensor | None = None
        self.square: Tensor | None = None

    def add(self, gradient: Tensor) -> None:
        g = gradient.detach().double()
        if self.mean is None:
            self.mean, self.square = torch.zeros_like(g), torch.zeros_like(g)
        self.mean.mul_(self.decay).add_(g, alpha=1 - self.decay)
        self.square.mul_(self.decay).add_(g * g, alpha=1 - self.decay)
        self.steps += 1

    def value(self, index: Tensor | None = None) -> float:
        if self.mean is None:
            return float("nan")
        correction = 1 - self.decay**self.steps
        mean, square = self.mean / correction, self.square / correction
        if index is not None:
            mean, square = mean[index], square[index]
        return float((square - mean * mean).clamp_min(0).mean())

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "mean": self.mean, "square": self.square}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.mean, self.square = state["steps"], state["mean"], state["square"]


class CellInterrupted(Exception):
    """SIGTERM or SIGINT stopped :func:`run_cell` between two steps (after saving its checkpoint,
    when it had a path)."""


def hard_sample(latent: Latent, logits: Tensor, generator: torch.Generator) -> Tensor:
    """One exact draw z ~ p(logits) per batch element, like ``logits``, from ``generator``
    (Bernoulli: 1[u < sigmoid(theta)]; categorical: Gumbel-max)."""
    logits = logits.detach()
    u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype, device=logits.device)
    if latent.kind == "bernoulli":
        return (u < torch.sigmoid(logits)).to(logits.dtype)
    u = u.clamp_min(torch.finfo(logits.dtype).tiny)
    return one_hot((logits - torch.log(-torch.log(u))).argmax(-1), latent.categories,
                   logits.dtype)  # theta + Gumbel(0, 1)


#: offset of the seed of the generator that draws the hard samples of the discrete loss
DISCRETE_LOSS_SEED_OFFSET = 0x5EED_1055


class _Training:
    """The whole mutable state of one cell's training loop, its two kinds of steps (measure at
    a step, train one step) and its checkpoint.

    The loop position is (``step``, ``measured``): training steps ``0 .. step-1`` are done, and
    ``measured`` says whether the measurements at ``step`` (gradient phase, training and
    evaluation rows) are recorded yet.
    """

    def __init__(self, cell: Cell, measure: Measure, device: str) -> None:
        torch.manual_seed(cell.seed)
        self.cell, self.measure = cell, measure
        self.generator = torch.Generator().manual_seed(cell.seed)
        self.task, self.estimator = build(cell)
        self.device = torch.device(device)
        self.params = self.task.init(self.generator, self.device)
        self.optimizer = _optimizer(measure.optimizer, list(self.params.values()), measure.lr)
        # hard samples for the discrete loss come from their own stream, so recording the loss
        # leaves every other draw, and so the training trajectory, as it was
        self.loss_generator = torch.Generator(device=self.device).manual_seed(
            cell.seed + DISCRETE_LOSS_SEED_OFFSET)
        self.trajectory = TrajectoryVariance(measure.ema_decay)
        self.groups = group_indices(self.params, self.task.parameter_groups())
        self.step = 0
        self.measured = False
        self.train_time = 0.0
        self.losses: list[Tensor] = []  # f at hard samples z ~ p_theta, this logging window
        self.estimator_losses: list[Tensor] = []  # the estimator's own values, same window
        self.records: list[dict[str, Any]] = []

    # the two kinds of steps --------------------------------------------------------------
    def measure_step(self) -> None:
        """The measurements at ``step``: gradient quality at the checkpoints, training rows every
        ``log_every`` steps, evaluation rows (phase ``eval``) every ``eval_every`` steps."""
        step, measure = self.step, self.measure
        if step in measure.checkpoints:
            self.estimator.train(False)
            self.records += _gradient_phase(self.task, self.estimator, self.params, measure,
                                            self.generator, step)
        last = step == measure.steps
        evaluating = step % (measure.eval_every or measure.log_every) == 0 or last
        if step % measure.log_every == 0 or last:
            self.records += _records("train", step, self._training_metrics(step))
        elif evaluating:  # the wall-clock of the evaluation rows
            self.records += _records("train", step, [MetricValue("wall_time_s", self.train_time)])
        if evaluating:
            evaluation = self.task.evaluate(self.params, self.generator)
            self.records += _records("eval", step,
                                     [MetricValue(k, v) for k, v in evaluation.items()])
        self.measured = True

    def _training_metrics(self, step: int) -> list[MetricValue]:
        """Wall-clock, and over the window since the last log: the discrete loss, the
        estimator's own loss and the trajectory variance; empties the window."""
        logged = [MetricValue("wall_time_s", self.train_time)]
        if not self.losses:
            return logged
        loss = float(torch.stack(self.losses).mean())
        loss_estimator = float(torch.stack(self.estimator_losses).mean())
        if not (math.isfinite(loss) and math.isfinite(loss_estimator)):
            raise NonFiniteError(f"non-finite training loss before step {step}")
        logged.append(MetricValue("loss", loss))
        logged.append(MetricValue("loss_estimator", loss_estimator))
        logged.append(MetricValue("grad_var_ema", self.trajectory.value()))
        logged += [MetricValue(f"{g}/grad_var_ema", self.trajectory.value(i))
                   for g, i in self.groups.items()]
        self.losses, self.estimator_losses = [], []
        return logged

    def train_step(self) -> None:
        """One optimiser step with the estimator; the discrete loss at the same parameters and
        batch is recorded outside the timed part."""
        started = time.perf_counter()
        self.estimator.train(True)
        self.estimator.begin_step(self.step)
        batch = self.task.sample_batch(self.generator)
        logits = self.task.logits(self.params, batch)
        f = self.task.cost(self.params, batch)
        estimate = self.estimator.estimate(logits, f, self.task.latent)
        _sync(self.device)
        paused = time.perf_counter()
        with torch.no_grad():
            z = hard_sample(self.task.latent, logits, self.loss_generator)
            self.losses.append(f(z).mean())
        _sync(self.device)
        resumed = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        estimate.surrogate.mean().backward()
        self.optimizer.step()
        self.estimator.update(estimate)
        _sync(self.device)
        self.train_time += time.perf_counter() - started - (resumed - paused)
        self.estimator_losses.append(estimate.value.detach().mean())
        leaves = list(self.params.values())
        self.trajectory.add(flatten_gradients([p.grad for p in leaves], leaves))
        self.step += 1
        self.measured = False

    def throughput(self) -> None:
        estimator = self.estimator
        estimator.train(True)  # time what a training step pays; update() is never called here
        estimator.begin_step(0)
        batch = self.task.sample_batch(self.generator)
        self.records += _records(
            "throughput", 0,
            measure_throughput(self.task, estimator, self.params, batch,
                               self.measure.throughput_min_time),
        )

    # checkpoint --------------------------------------------------------------------------
    def _generators(self) -> dict[str, torch.Generator]:
        return {"cell": self.generator, "discrete_loss": self.loss_generator}

    def state_dict(self) -> dict[str, Any]:
        """Everything the loop needs to go on exactly as if it had never stopped."""
        return {
            "identity": checkpoint_identity(self.cell, self.measure, self.device),
            "step": self.step,
            "measured": self.measured,
            "train_time": self.train_time,
            "params": {k: v.detach() for k, v in self.params.items()},
            "optimizer": self.optimizer.state_dict(),
            "estimator": self.estimator.state_dict(),
            "trajectory": self.trajectory.state_dict(),
            "losses": list(self.losses),
            "estimator_losses": list(self.estimator_losses),
            "records": self.records,
            "rng": rng_states(self._generators(), self.device),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for name, value in self.params.items():
                value.copy_(state["params"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.estimator.load_state_dict(state["estimator"])
        self.trajectory.load_state_dict(state["trajectory"])
        self.step, self.measured = state["step"], state["measured"]
        self.train_time = state["train_time"]
        self.losses = list(state["losses"])
        self.estimator_losses = list(state["estimator_losses"])
        self.records = list(state["records"])
        # last: rebuilding lazily created networks above draws from the global generator
        restore_rng_states(state["rng"], self._generators(), self.device)


def _start(cell: Cell, measure: Measure, device: str, checkpoint: Path | None) -> _Training:
    """A fresh training state, or the one saved in ``checkpoint`` when it belongs to this cell
    (a foreign, unreadable or inconsistent file is ignored with a warning)."""
    training = _Training(cell, measure, device)
    if checkpoint is None:
        return training
    saved = load_checkpoint(checkpoint, checkpoint_identity(cell, measure, training.device))
    if saved is None:
        return training
    try:
        training.load_state_dict(saved)
    except (KeyError, TypeError, ValueError, RuntimeError, EstbenchError) as err:
        warnings.warn(f"checkpoint {checkpoint} does not fit this cell ({err}); the cell "
                      f"starts over", CheckpointWarning, stacklevel=3)
        return _Training(cell, measure, device)
    return training


def run_cell(cell: Cell, measure: Measure, device: str = "cpu", *,
             checkpoint: Path | None = None,
             on_step: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """Train and measure one cell; returns its observations (without the shared columns).

    ``checkpoint``: the file where the cell saves its whole state every
    ``measure.checkpoint_every`` steps (after that step's measurements) and on SIGTERM / SIGINT,
    and from which it resumes when the file belongs to this cell. A resumed cell returns the same
    rows, bit for bit on CPU apart from wall-clock metrics, as one that never stopped. On
    SIGTERM / SIGINT (handled while this runs, in the main thread) the cell stops at the next
    step boundary, saves, and raises :class:`CellInterrupted`; a gradient phase under way
    finishes first. ``on_step(done, total)`` is called after every training step.
    """
    every = measure.checkpoint_every
    with StopOnSignals() as stop:
        training = _start(cell, measure, device, checkpoint)

        def save() -> None:
            if checkpoint is not None:
                save_checkpoint(checkpoint, training.state_dict())

        while not stop.requested:
            if not training.measured:
                training.measure_step()
                if every and training.step % every == 0 and 0 < training.step < measure.steps:
                    save()
            if training.step == measure.steps or stop.requested:
                break
            training.train_step()
            if on_step is not None:
                on_step(training.step, measure.steps)
        finished = training.step == measure.steps and training.measured
        if stop.requested and not finished:
            save()
            where = f"saved to {checkpoint}" if checkpoint is not None else "no checkpoint path"
            raise CellInterrupted(f"{stop.signal_name} at step {training.step} of {measure.steps} "
                                  f"({where})")
    if measure.throughput:
        training.throughput()
    return training.records


def cell_frame(cell: Cell, records: list[dict[str, Any]], run: str, device: str,
               prov: dict[str, Any]) -> pd.DataFrame:
    """Attach the shared identity and provenance columns to a cell's observations."""
    task_cls = TASKS.get(cell.task)
    label = ESTIMATORS.get(cell.estimator).from_params(cell.estimator_params).label()
    common = {
        "run": run,
        "cell": cell.id,
        "task": cell.task,
        "task_version": str(task_cls.version),
        "task_params": json.dumps(cell.task_params, sort_keys=True),
        "estimator": cell.estimator,
        "estimator_params": json.dumps(cell.estimator_params, sort_keys=True),
        "estimator_label": label,
        "seed": cell.seed,
        "device": device,
        "package_version": prov["package_version"],
        "git_sha": prov["git_sha"],
        "torch_version": prov["torch_version"],
        "device_name": prov["device_name"],
        "timestamp": pd.Timestamp.now(tz="UTC"),
    }
    return to_rows(records, common)
