"""Sweep runner: a grid of ml_collections config overrides, one job process per cell.

Run (from the repository root):
  python -m experiments.sweep --config=configs/sweeps/<name>.py
On several hosts sharing the file system, run the same command on every host with its share:
  python -m experiments.sweep --config=configs/sweeps/<name>.py \
      --config.num_hosts=4 --config.host_index=<0..3>
or set ``SWEEP_NUM_HOSTS`` / ``SWEEP_HOST_INDEX`` in each host's environment (the config fields
win when set). ``--config.dry_run=True`` prints the cells and their commands without running.

A sweep config file's ``get_config()`` returns :func:`base_config` with ``workroot`` and
``grids`` filled in; every grid is made by :func:`grid`. A grid is a job config file, fixed
overrides and named axes; every axis level is a dict of overrides ``{"a.b": value}`` (the
dotted path of ``--config.a.b=value``). The product of the axes gives the cells. Cell names,
the config file argument, the group and every string override value are ``str.format``
templates over the axis names (each replaced by the cell's level name) and ``workroot``.

For each cell the runner:

1. checks before anything runs that every override names an existing field of the job config,
   with a value of a compatible type (:class:`SweepError` names the cell and the field);
2. skips it when ``<workdir>/sweep_done.json`` exists (written after a successful run) and
   records the same command — a marker with another command is an error, because the workdir
   holds the state of a different run (delete the workdir to rerun the cell);
3. otherwise runs ``python -m normguard_jax.main --config=<file> --workdir=<workdir>
   --config.<path>=<value> ...`` with output appended to ``<workdir>/sweep.log``, and writes
   the marker when the process exits with status 0 and every ``expect`` file of its grid
   exists (a job that stops early on SIGTERM exits 0 without them);
4. prints one progress line (cells done, skipped, failed, elapsed, ETA from the mean time of
   the cells run so far) and rewrites the summary JSON (``<workroot>/sweep_summary.json``, or
   ``sweep_summary_host<i>of<n>.json`` on several hosts).

Cells run one at a time, ordered by group (in order of first appearance), then by grid: a
group is the unit that goes to one host, so cells that read another cell's output (e.g. the
evaluation of an RL run) must share its group and come from a later grid. With ``num_hosts``
hosts, group j (in that order) runs on host ``j % num_hosts``: every cell runs on exactly one
host. SIGTERM to the runner is passed to the running job; the runner then stops without
marking that cell, so a rerun resumes it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence

import ml_collections

import configs

DONE_MARKER = "sweep_done.json"   # written into a cell's workdir after it succeeded.
LOG_FILE = "sweep.log"            # the cell process's stdout and stderr (appended).
DEFAULT_PROGRAM = (sys.executable, "-m", "normguard_jax.main")
_NAME = re.compile(r"^[A-Za-z0-9._=+-]+$")


class SweepError(ValueError):
    """A sweep that cannot run as configured (raised before any cell runs)."""


@dataclasses.dataclass(frozen=True)
class Cell:
    """One job of a sweep.

    Attributes:
      name: unique, file-system safe; also the default workdir ``<workroot>/<name>``.
      config: job config file, optionally with its argument (``path:arg``).
      overrides: ``((dotted path, value), ...)`` in command-line order.
      workdir: the job's ``--workdir``.
      group: cells of one group run on one host, in grid order.
      program: argv prefix of the job (``python -m normguard_jax.main`` by default).
      expect: paths, relative to ``workdir``, that a finished job has written.
    """
    name: str
    config: str
    overrides: tuple[tuple[str, object], ...]
    workdir: str
    group: str
    program: tuple[str, ...] = DEFAULT_PROGRAM
    expect: tuple[str, ...] = ()

    def command(self) -> list[str]:
        """The job's argv: program, ``--config``, ``--workdir`` and one flag per override."""
        return [*self.program, f"--config={self.config}", f"--workdir={self.workdir}",
                *(f"--config.{path}={format_value(value)}" for path, value in self.overrides)]


def format_value(value) -> str:
    """An override value as ml_collections' config flags parse it (bools as true/false)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def base_config() -> ml_collections.ConfigDict:
    """Runner fields of a sweep config; a sweep file sets ``workroot`` and ``grids``."""
    c = ml_collections.ConfigDict()
    c.workroot = ""        # directory holding one workdir per cell and the summary JSON.
    c.grids = []           # list of grid(...) dicts, expanded in order.
    c.num_hosts = 0        # hosts sharing the sweep; 0 = $SWEEP_NUM_HOSTS, else 1.
    c.host_index = -1      # this host, in [0, num_hosts); -1 = $SWEEP_HOST_INDEX, else 0.
    c.only = ""            # comma-separated fnmatch patterns of cell names to run ("" = all).
    c.dry_run = False      # print the cells and commands, run nothing.
    c.keep_going = False   # after a failed cell, run the next one (else stop).
    return c


def grid(*, name: str, config: str, axes: Mapping[str, Mapping[str, Mapping[str, object]]],
         fixed: Mapping[str, object] | None = None, group: str = "", workdir: str = "",
         program: Sequence[str] = DEFAULT_PROGRAM, expect: Sequence[str] = ()) -> dict:
    """One grid of a sweep config (plain data, so that it prints and serialises).

    Args:
      name: cell-name template, e.g. ``"rl-{method}-{arm}"``; must name every axis with more
        than one level, so that names are unique.
      config: job config file template, e.g. ``"configs/rl_table.py:{method}"``.
      axes: axis name -> level name -> overrides (``{"normguard.weight": 0.1}``); the
        product of all axes, in insertion order (the last axis varies fastest).
      fixed: overrides of every cell (a level's override of the same path wins).
      group: host-partition group template ("" = the cell's name).
      workdir: workdir template ("" = ``{workroot}/<cell name>``).
      program: argv prefix of the job.
      expect: templates of files (relative to the workdir) a finished job leaves behind.
    """
    return {"name": name, "config": config,
            "axes": {a: {lv: dict(o) for lv, o in levels.items()} for a, levels in axes.items()},
            "fixed": dict(fixed or {}), "group": group, "workdir": workdir,
            "program": list(program), "expect": list(expect)}


def _format(template, fields: dict, what: str):
    if not isinstance(template, str):
        return template
    try:
        return template.format(**fields)
    except (KeyError, IndexError) as e:
        known = sorted(fields)
        raise SweepError(f"{what}: template {template!r} names {e}, which is neither an axis "
                         f"nor 'workroot' (known: {known})") from None


def expand(config: ml_collections.ConfigDict) -> list[Cell]:
    """All cells of a sweep config, ordered by group (first appearance), then grid.

    Raises:
      SweepError: missing workroot, empty axis, unknown template field, unsafe or duplicate
        cell name, or two axes of one grid overriding the same field.
    """
    if not config.workroot:
        raise SweepError("config.workroot must name the sweep's directory")
    if not config.grids:
        raise SweepError("config.grids is empty: add grid(...) entries")
    cells: list[Cell] = []
    for gi, g in enumerate(config.grids):
        where = f"grid {gi} ({g['name']!r})"
        axes = list(g["axes"].items())
        for axis, levels in axes:
            if not levels:
                raise SweepError(f"{where}: axis {axis!r} has no levels")
        for combo in itertools.product(*[list(levels.items()) for _, levels in axes]):
            fields = {"workroot": config.workroot}
            fields.update({axis: level for (axis, _), (level, _) in zip(axes, combo)})
            overrides = dict(g["fixed"])
            set_by = {}
            for (axis, _), (level, level_overrides) in zip(axes, combo):
                for path, value in level_overrides.items():
                    if path in set_by:
                        raise SweepError(f"{where}: axes {set_by[path]!r} and {axis!r} both "
                                         f"override {path!r}")
                    set_by[path] = axis
                    overrides[path] = value
            name = _format(g["name"], fields, where)
            if not _NAME.match(name):
                raise SweepError(f"{where}: cell name {name!r} must match {_NAME.pattern}")
            what = f"cell {name!r}"
            cells.append(Cell(
                name=name, config=_format(g["config"], fields, what),
                overrides=tuple((p, _format(v, fields, what)) for p, v in overrides.items()),
                workdir=_format(g["workdir"], fields, what) or os.path.join(config.workroot,
                                                                            name),
                group=_format(g["group"], fields, what) or name,
                program=tuple(g["program"]),
                expect=tuple(_format(e, fields, what) for e in g["expect"])))
    seen = {}
    for cell in cells:
        if cell.name in seen:
            raise SweepError(f"two cells are named {cell.name!r}: every axis with more than one "
                             "level must appear in the grid's name template")
        seen[cell.name] = cell
    order = {}
    for cell in cells:
        order.setdefault(cell.group, len(order))
    return sorted(cells, key=lambda c: order[c.group])  # stable: grid order within a group


def partition(cells: Sequence[Cell], num_hosts: int, host_index: int) -> list[Cell]:
    """The cells of host ``host_index``: those whose group's index is ``host_index`` mod
    ``num_hosts`` (groups indexed in order of first appearance in ``cells``)."""
    if num_hosts < 1 or not 0 <= host_index < num_hosts:
        raise SweepError(f"host_index must be in [0, num_hosts), got host_index={host_index}, "
                         f"num_hosts={num_hosts}")
    order = {}
    for cell in cells:
        order.setdefault(cell.group, len(order))
    return [c for c in cells if order[c.group] % num_hosts == host_index]


def hosts(config: ml_collections.ConfigDict, environ: Mapping[str, str] = os.environ
          ) -> tuple[int, int]:
    """``(num_hosts, host_index)`` from the config, else ``SWEEP_NUM_HOSTS`` /
    ``SWEEP_HOST_INDEX``, else ``(1, 0)``."""
    def read(field, default, var):
        value = config[field]
        if value != default:
            return int(value)
        if environ.get(var, "") != "":
            try:
                return int(environ[var])
            except ValueError:
                raise SweepError(f"${var} must be an integer, got {environ[var]!r}") from None
        return None
    num = read("num_hosts", 0, "SWEEP_NUM_HOSTS") or 1
    index = read("host_index", -1, "SWEEP_HOST_INDEX")
    index = 0 if index is None else index
    if num < 1 or not 0 <= index < num:
        raise SweepError(f"host_index must be in [0, num_hosts), got host_index={index}, "
                         f"num_hosts={num}")
    return num, index


# ----------------------------------------------------------------------------------------------
# Checking overrides against the job configs.
# ----------------------------------------------------------------------------------------------


def load_job_config(spec: str) -> ml_collections.ConfigDict:
    """Loads ``path[:arg]`` as ml_collections' config flag does: ``get_config(arg)``."""
    try:
        return configs.load(spec)
    except FileNotFoundError as e:
        raise SweepError(str(e)) from None


def _compatible(current, value) -> bool:
    if isinstance(current, bool) or isinstance(value, bool):
        return isinstance(current, bool) and isinstance(value, bool)
    if isinstance(current, float):
        return isinstance(value, (int, float))
    if isinstance(current, int):
        return isinstance(value, int)
    if isinstance(current, str):
        return isinstance(value, str)
    return True  # other types: the job's own config flag parser decides


def check_overrides(cell: Cell, job_config: ml_collections.ConfigDict) -> None:
    """Raises :class:`SweepError` unless every override of ``cell`` names an existing leaf
    field of ``job_config`` with a value of a compatible type."""
    for path, value in cell.overrides:
        node, walked = job_config, []
        for part in path.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                fields = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                raise SweepError(
                    f"cell {cell.name!r}: override {path!r} is not a field of {cell.config} "
                    f"(no {part!r} in config{''.join('.' + w for w in walked)}; it has "
                    f"{fields})")
            node = node[part]
            walked.append(part)
        if isinstance(node, ml_collections.ConfigDict):
            raise SweepError(f"cell {cell.name!r}: override {path!r} names a section of "
                             f"{cell.config}, not a field")
        if not _compatible(node, value):
            raise SweepError(f"cell {cell.name!r}: override {path}={value!r} "
                             f"({type(value).__name__}) does not fit the field's type "
                             f"{type(node).__name__} (current value {node!r})")


def check(cells: Sequence[Cell],
          load: Callable[[str], ml_collections.ConfigDict] = load_job_config) -> None:
    """Checks every cell's overrides and done marker before anything runs.

    Raises:
      SweepError: a bad override, or a done marker that records another command.
    """
    loaded = {}
    for cell in cells:
        if cell.config not in loaded:
            try:
                loaded[cell.config] = load(cell.config)
            except SweepError:
                raise
            except Exception as e:  # noqa: BLE001  (name the cell whose config does not load)
                raise SweepError(f"cell {cell.name!r}: config {cell.config!r} does not load: "
                                 f"{type(e).__name__}: {e}") from e
        check_overrides(cell, loaded[cell.config])
        done = read_marker(cell)
        if done is not None and done["command"] != cell.command():
            raise SweepError(
                f"cell {cell.name!r} finished earlier with another command; its workdir "
                f"{cell.workdir} holds that run. Delete the workdir to rerun the cell.\n"
                f"  then: {' '.join(done['command'])}\n  now:  {' '.join(cell.command())}")


# ----------------------------------------------------------------------------------------------
# Running.
# ----------------------------------------------------------------------------------------------


def finished_seconds(workroot: str) -> dict[str, float]:
    """Cell name -> its recorded wall time in seconds, for every cell directory under
    ``workroot`` that has a done marker (sorted by name; {} when ``workroot`` does not exist)."""
    out = {}
    for name in sorted(os.listdir(workroot)) if os.path.isdir(workroot) else []:
        path = os.path.join(workroot, name, DONE_MARKER)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                out[name] = json.load(f)["seconds"]
    return out


def read_marker(cell: Cell) -> dict | None:
    """The cell's done marker, or None when it has not finished."""
    path = os.path.join(cell.workdir, DONE_MARKER)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class _Forwarder:
    """Passes SIGTERM/SIGINT on to the running child and remembers that it came."""

    def __init__(self):
        self.child: subprocess.Popen | None = None
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):  # noqa: ARG002
        self.requested = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: no forwarding
                pass
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)


def run_cell(cell: Cell, forwarder: _Forwarder | None = None) -> tuple[bool, float, int]:
    """Runs one cell's job; returns ``(succeeded, seconds, exit status)``.

    Success: exit status 0, every ``expect`` file present and no stop requested; only then is
    the done marker written.
    """
    os.makedirs(cell.workdir, exist_ok=True)
    t0 = time.time()
    env = dict(os.environ)  # normguard_jax.main sets up the tuned glibc malloc by itself
    with open(os.path.join(cell.workdir, LOG_FILE), "a", encoding="utf-8") as log:
        log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cell.command())}\n")
        log.flush()
        child = subprocess.Popen(cell.command(), stdout=log, stderr=subprocess.STDOUT, env=env)
        if forwarder is not None:
            forwarder.child = child
        status = child.wait()
        if forwarder is not None:
            forwarder.child = None
    seconds = time.time() - t0
    missing = [e for e in cell.expect if not os.path.exists(os.path.join(cell.workdir, e))]
    stopped = forwarder is not None and forwarder.requested
    ok = status == 0 and not missing and not stopped
    if ok:
        with open(os.path.join(cell.workdir, DONE_MARKER), "w", encoding="utf-8") as f:
            json.dump({"cell": cell.name, "command": cell.command(), "seconds": seconds,
                       "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, f, indent=1)
    elif status == 0 and missing:
        with open(os.path.join(cell.workdir, LOG_FILE), "a", encoding="utf-8") as log:
            log.write(f"# exit 0 but missing {missing}: not marked done\n")
    return ok, seconds, status


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def summary_path(workroot: str, num_hosts: int, host_index: int) -> str:
    """Where the summary JSON of one host goes."""
    name = ("sweep_summary.json" if num_hosts == 1
            else f"sweep_summary_host{host_index}of{num_hosts}.json")
    return os.path.join(workroot, name)


def run(config: ml_collections.ConfigDict, *,
        load: Callable[[str], ml_collections.ConfigDict] = load_job_config,
        environ: Mapping[str, str] = os.environ, out=sys.stdout) -> dict:
    """Expands, checks and runs (this host's share of) a sweep; returns the summary dict.

    The summary (also written as JSON) has ``cells``: name -> {status: done | skipped |
    failed | pending | stopped, seconds, exit_status, workdir, command}, plus the host split.
    """
    cells = expand(config)
    num_hosts, host_index = hosts(config, environ)
    mine = partition(cells, num_hosts, host_index)
    if config.only:
        import fnmatch  # noqa: PLC0415
        patterns = [p for p in config.only.split(",") if p]
        mine = [c for c in mine if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]
    check(mine, load)
    path = summary_path(config.workroot, num_hosts, host_index)
    summary = {"workroot": config.workroot, "num_hosts": num_hosts, "host_index": host_index,
               "total_cells": len(cells),
               "cells": {c.name: {"status": "pending", "seconds": None, "exit_status": None,
                                  "workdir": c.workdir, "group": c.group,
                                  "command": c.command()} for c in mine}}

    def write_summary():
        os.makedirs(config.workroot, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)

    def say(text):
        print(f"[sweep {time.strftime('%H:%M:%S')}] {text}", file=out, flush=True)

    say(f"{len(mine)} of {len(cells)} cells on host {host_index}/{num_hosts} "
        f"({config.workroot})")
    if config.dry_run:
        for c in mine:
            state = "done" if read_marker(c) is not None else "todo"
            say(f"{state:4s} {c.name} [{c.group}]: {' '.join(c.command())}")
        return summary
    write_summary()
    t_start, ran, counts = time.time(), [], {"done": 0, "skipped": 0, "failed": 0}
    with _Forwarder() as forwarder:
        for i, cell in enumerate(mine):
            entry = summary["cells"][cell.name]
            if read_marker(cell) is not None:
                entry.update(status="skipped", seconds=read_marker(cell)["seconds"])
                counts["skipped"] += 1
                say(f"{i + 1}/{len(mine)} {cell.name}: already done, skipped")
                continue
            say(f"{i + 1}/{len(mine)} {cell.name}: running (log {cell.workdir}/{LOG_FILE})")
            ok, seconds, status = run_cell(cell, forwarder)
            entry.update(seconds=seconds, exit_status=status)
            if forwarder.requested:
                entry["status"] = "stopped"
                write_summary()
                say(f"stop requested: {cell.name} left unfinished (rerun to resume)")
                break
            ran.append(seconds)
            entry["status"] = "done" if ok else "failed"
            counts["done" if ok else "failed"] += 1
            remaining = sum(1 for c in mine[i + 1:] if read_marker(c) is None)
            eta = remaining * sum(ran) / len(ran)
            write_summary()
            say(f"{i + 1}/{len(mine)} {cell.name}: {entry['status']} in {_minutes(seconds)}"
                f"{'' if ok else f' (exit {status}; see {cell.workdir}/{LOG_FILE})'} | "
                f"done {counts['done']}, skipped {counts['skipped']}, failed {counts['failed']}"
                f" | elapsed {_minutes(time.time() - t_start)}, ETA {_minutes(eta)} "
                f"for {remaining} cells")
            if not ok and not config.keep_going:
                say("stopping after a failed cell (set keep_going=True to continue)")
                break
    write_summary()
    return summary


def cli() -> None:
    """CLI: ``python -m experiments.sweep --config=configs/sweeps/<name>.py [--config.X=..]``.

    Exits with a message naming the cells that failed or were stopped (status 1), else 0.
    """
    from absl import app  # noqa: PLC0415  (the library part needs neither absl nor flags)
    from ml_collections import config_flags  # noqa: PLC0415

    flag = config_flags.DEFINE_config_file(
        "config", None, "Sweep config file (configs/sweeps/<name>.py).", lock_config=True)

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
        try:
            summary = run(flag.value)
        except SweepError as e:
            sys.exit(f"sweep: {e}")
        failed = [n for n, e in summary["cells"].items()
                  if e["status"] in ("failed", "stopped")]
        if failed:
            sys.exit(f"sweep: {len(failed)} cell(s) not finished: {', '.join(failed)}")

    app.run(main)


if __name__ == "__main__":
    cli()
