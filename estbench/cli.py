"""The ``estbench`` command line: list, run, show."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from estbench.errors import EstbenchError, RunInterrupted

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="estbench",
        description="Benchmark gradient estimators for discrete random variables.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p_list = sub.add_parser("list", help="list registered estimators or tasks")
    p_list.add_argument("what", choices=("estimators", "tasks"))
    p_list.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import MODULE (name or .py path) to register more components")

    p_run = sub.add_parser("run", help="run a comparison matrix from a TOML spec")
    p_run.add_argument("spec", help="path to the spec, e.g. runs/quick.toml")
    p_run.add_argument("--out", help="run directory (default: runs/<spec name>)")
    p_run.add_argument("--device", choices=("cpu", "cuda"), help="override the spec's device")
    p_run.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                       help="import MODULE (name or .py path) to register more components")
    p_run.add_argument("--force", action="store_true", help="rerun cells that already finished")
    p_run.add_argument("--executor", choices=("local", "ray"), default="local",
                       help="local worker processes (default) or a Ray cluster")
    p_run.add_argument("--workers", type=int, default=None,
                       help="local worker processes (default: the cores available)")
    p_run.add_argument("--address", help="Ray cluster address, e.g. 127.0.0.1:6379")
    p_run.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    p_show = sub.add_parser("show", help="summarise a run directory")
    p_show.add_argument("run_dir")

    p_check = sub.add_parser("check", help="run the contract suite on one estimator")
    p_check.add_argument("estimator", help="a registered estimator name")
    p_check.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                         help="import MODULE (name or .py path) to register more components")
    p_check.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                         help="an estimator hyperparameter (TOML value), e.g. temperature=0.5")
    p_check.add_argument("--samples", type=int, default=20_000,
                         help="gradient estimates per bias test (default 20000)")

    p_report = sub.add_parser("report", help="write figures, report.html and summary.md")
    p_report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                          help="a run directory, or several to compare")
    p_report.add_argument("--out", help="output directory (default: RUN_DIR/report)")
    p_report.add_argument("--estimators", nargs="+", action="extend", default=[],
                          metavar="NAME", help="only these estimators: names, configuration "
                          "labels or globs such as 'gumbel*' (comma-separated or repeated)")
    p_report.add_argument("--tasks", nargs="+", action="extend", default=[], metavar="NAME",
                          help="only these tasks: names, labels or globs")
    return parser


def _cmd_list(args: argparse.Namespace) -> int:
    from estbench.registry import ESTIMATORS, TASKS

    if args.what == "estimators":
        rows = [
            {"name": n, "supports": ",".join(sorted(c.supports)),
             "unbiased": "yes" if c.unbiased else "no", "description": c.description}
            for n, c in ((n, ESTIMATORS.get(n)) for n in ESTIMATORS.names())
        ]
    else:
        rows = []
        for name in TASKS.names():
            cls = TASKS.get(name)
            latent = cls().latent
            rows.append({"name": name, "latent": latent.describe(), "version": cls.version,
                         "description": cls.description})
    print(pd.DataFrame(rows).to_string(index=False))
    return 0


@dataclass
class _CellSteps:
    """Training steps of a running cell, and when and where step reports began (for the rate)."""

    done: int = 0
    total: int = 0
    first_time: float = 0.0
    first_done: int = 0
    last_time: float = 0.0

    def text(self, cell_id: str) -> str:
        task, estimator, seed, digest = (cell_id.split("__") + ["", "", "", ""])[:4]
        label = f"{task}/{estimator}/{seed}/{digest[:4]}"
        if not self.total:
            return label
        text = f"{label} {self.done}/{self.total}"
        if self.done > self.first_done and self.last_time > self.first_time:
            rate = (self.done - self.first_done) / (self.last_time - self.first_time)
            text += f" ~{(self.total - self.done) / rate:.0f}s left"
        return text


class _ProgressDisplay:
    """The tqdm bar of a run: cells done, failed, skipped and running, and for each running cell
    its training steps done of total with an estimate of the time left. Redrawn at most every
    ``interval`` seconds; silent when disabled (``--no-progress`` or stderr not a terminal)."""

    def __init__(self, total: int, name: str, out: Path, disable: bool,
                 interval: float = 0.5) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=name, unit="cell", disable=disable, file=sys.stderr)
        self.out = out
        self.enabled = not disable
        self.interval = interval
        self.counts = {"done": 0, "failed": 0, "skipped": 0}
        self.running: dict[str, _CellSteps] = {}
        self.drawn = 0.0

    def cell(self, cell_id: str, status: str) -> None:
        if status == "running":
            self.running[cell_id] = _CellSteps()
        else:
            self.running.pop(cell_id, None)
            if status in self.counts:
                self.counts[status] += 1
                self.bar.update(1)
            if status == "failed" and self.enabled:
                self.bar.write(f"FAILED {cell_id}: see {self.out / 'errors' / (cell_id + '.txt')}",
                               file=sys.stderr)
        self._draw(force=True)

    def step(self, cell_id: str, done: int, total: int) -> None:
        steps = self.running.get(cell_id)
        if steps is None:
            return
        now = time.monotonic()
        if not steps.first_time:
            steps.first_time, steps.first_done = now, done
        steps.done, steps.total, steps.last_time = done, total, now
        self._draw()

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self.drawn < self.interval):
            return
        self.drawn = now
        running = [steps.text(cell_id) for cell_id, steps in self.running.items()]
        counts = ", ".join(f"{k}={v}" for k, v in self.counts.items())
        self.bar.set_postfix_str(f"{counts}, running={len(running)}"
                                 + ("; " + "; ".join(running) if running else ""), refresh=True)

    def close(self) -> None:
        self.bar.close()


def _warn(line: str) -> None:
    print(f"estbench: warning: {line}", file=sys.stderr)


def _cmd_run(args: argparse.Namespace) -> int:
    from estbench.run import run_spec
    from estbench.spec import load_spec

    spec = load_spec(args.spec)
    out = Path(args.out) if args.out else Path("runs") / spec.name
    quiet = args.no_progress or not sys.stderr.isatty()
    display = _ProgressDisplay(len(spec.cells()), spec.name, out, disable=quiet)
    try:
        summary = run_spec(spec, out, device=args.device, force=args.force,
                           executor=args.executor, workers=args.workers, address=args.address,
                           plugins=tuple(args.plugin), progress=display.cell,
                           on_step=display.step, warn=_warn)
    finally:
        display.close()
    print(f"{len(summary.done)} cells run, {len(summary.reused)} reused, "
          f"{len(summary.skipped)} skipped, {len(summary.failed)} failed -> {out}")
    if quiet:
        for cell_id, path in summary.failed.items():
            print(f"FAILED {cell_id}: see {path}", file=sys.stderr)
    _print_summary(out)
    return 0 if summary.ok else 1


def _print_summary(run_dir: Path) -> None:
    from analysis.bias import VERDICT_LEGEND
    from analysis.summary import (format_summary, interval_caption, summary_table,
                                  without_uniform_columns)
    from estbench.store import load_results

    results = load_results(run_dir, on_skip=lambda name, why: _warn(f"left out {name}: {why}"))
    formatted = format_summary(summary_table(results))
    table = without_uniform_columns(formatted)
    print(f"\n{interval_caption(formatted)}")
    with pd.option_context("display.width", 250, "display.max_columns", 20,
                           "display.max_colwidth", 40):
        for task, rows in table.groupby("task_label", sort=True):
            print(f"\n== {task}")
            print(rows.drop(columns=["task_label"]).to_string(index=False))
    if "bias note" in table:
        print(f"\n{VERDICT_LEGEND}")


def _cmd_show(args: argparse.Namespace) -> int:
    from estbench.lock import RunLock
    from estbench.store import read_manifest

    run_dir = Path(args.run_dir)
    manifest = read_manifest(run_dir)
    cells = manifest["cells"]
    statuses = pd.Series([c.get("status", "?") for c in cells.values()]).value_counts().to_dict()
    status = manifest.get("status", "?")
    if status == "running" and not RunLock.held(run_dir):
        status = "stopped mid-run (its process is gone; rerun the spec into it to resume)"
    print(f"run {manifest.get('run', run_dir.name)}: {status}, cells {statuses}")
    _print_summary(run_dir)
    for cell_id, info in cells.items():
        if info.get("status") == "skipped":
            print(f"SKIPPED {cell_id}: {info.get('reason') or 'no reason recorded'}")
    for cell_id, info in cells.items():
        if info.get("status") == "failed":
            print(f"FAILED {cell_id}: {info.get('reason') or ''} (see "
                  f"{run_dir / 'errors' / (cell_id + '.txt')})")
    return 0


def _parse_params(pairs: list[str]) -> dict:
    import tomllib

    params = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise EstbenchError(f"--param must look like KEY=VALUE, got {pair!r}")
        try:
            params[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            params[key.strip()] = raw  # a bare word is a string
    return params


def _cmd_check(args: argparse.Namespace) -> int:
    from estbench.check import check_estimator
    from estbench.registry import ESTIMATORS

    if args.samples < 100:
        raise EstbenchError(f"--samples must be >= 100, got {args.samples}")
    cls = ESTIMATORS.get(args.estimator)
    table, passed = check_estimator(args.estimator, _parse_params(args.param), args.samples)
    claim = "claims unbiased" if cls.unbiased else "does not claim unbiasedness"
    print(f"estimator '{args.estimator}' ({claim}); bias test: {args.samples} estimates per "
          f"task, Bonferroni p-value of the largest |z| against the exact gradient > 0.001")
    with pd.option_context("display.width", 200, "display.max_colwidth", 80,
                           "display.float_format", "{:.3g}".format):
        print(table.to_string(index=False))
    print("verdict: " + ("PASS" if passed else "FAIL: a stated contract does not hold"))
    return 0 if passed else 1


def _cmd_report(args: argparse.Namespace) -> int:
    from analysis.report import write_report

    def names(values: list[str]) -> list[str]:
        import re

        # commas inside a configuration label's parentheses are part of the label
        return [name.strip() for value in values for name in re.split(r",(?![^()]*\))", value)
                if name.strip()]

    path = write_report(args.run_dirs, args.out, estimators=names(args.estimators),
                        tasks=names(args.tasks))
    print(f"report written: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        from estbench.registry import load_builtins, load_plugin

        load_builtins()
        for plugin in getattr(args, "plugin", []):
            load_plugin(plugin)
        commands = {"list": _cmd_list, "run": _cmd_run, "show": _cmd_show, "check": _cmd_check,
                    "report": _cmd_report}
        return commands[args.command](args)
    except EstbenchError as err:
        print(f"estbench: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("estbench: interrupted; finished cells are kept, rerun to resume", file=sys.stderr)
        return 128 + signal.SIGINT
    except RunInterrupted as err:
        print(f"estbench: {err}", file=sys.stderr)
        return 128 + err.signum


if __name__ == "__main__":
    sys.exit(main())
