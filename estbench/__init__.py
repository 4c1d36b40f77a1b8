"""estbench: a benchmark harness for gradient estimators of discrete random variables."""

__version__ = "0.1.0"

from estbench.contracts import Cost, Estimate, Estimator, Params, Task
from estbench.errors import EstbenchError, SpecError
from estbench.gradients import reference_gradient, sample_gradients, stream_draws
from estbench.hyperparams import hyper
from estbench.latents import Latent
from estbench.metrics import GRADIENT_METRICS, StreamingGradientMetrics, gradient_metrics
from estbench.registry import (
    ESTIMATORS,
    TASKS,
    load_builtins,
    load_plugin,
    register_estimator,
    register_task,
)
from estbench.spec import Cell, Measure, Spec, load_spec, parse_spec
from estbench.store import SCHEMA, load_results

__all__ = [
    "__version__",
    "Cell",
    "Cost",
    "ESTIMATORS",
    "Estimate",
    "EstbenchError",
    "Estimator",
    "GRADIENT_METRICS",
    "Latent",
    "Measure",
    "Params",
    "SCHEMA",
    "Spec",
    "SpecError",
    "StreamingGradientMetrics",
    "TASKS",
    "Task",
    "gradient_metrics",
    "hyper",
    "load_builtins",
    "load_plugin",
    "load_results",
    "load_spec",
    "parse_spec",
    "reference_gradient",
    "register_estimator",
    "register_task",
    "sample_gradients",
    "stream_draws",
]
