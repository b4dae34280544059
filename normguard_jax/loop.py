"""The one run loop: pretraining and RL plug their unit of work (a step, an iteration) into it.

:func:`run` owns everything around the unit: the Orbax checkpoint manager, SIGTERM and Ctrl-C,
the count of skipped (non-finite) updates, scalar logs with progress (steps/s, ETA), fixed-seed
sample grids, and the final save. What it guarantees:

- after unit ``n`` (1-based) a checkpoint at ``n`` is saved when ``n`` is a multiple of the
  manager's interval, and always at the end, on SIGTERM and on Ctrl-C (each step saved once);
- SIGTERM on any process checkpoints the last completed unit and returns; Ctrl-C lets the unit
  in progress finish, checkpoints it and raises ``KeyboardInterrupt`` (a second Ctrl-C, or one
  outside the loop's polling, raises at once after a best-effort checkpoint);
- ``max_nonfinite`` units in a row with skipped updates stop the run with
  :class:`nonfinite.NonFiniteError`; the checkpoints written so far hold the last good state;
- scalars are written every ``log_every`` units, at the end, and at every unit with a skip.

The unit is a function ``unit(state, index) -> (state, metrics, skipped)`` with ``index`` the
0-based unit about to run, ``metrics`` a dict of scalars (device arrays are fine) and ``skipped``
the number of updates it skipped (an int or a scalar array, read once per unit).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterable, Optional

import jax
from absl import logging

from normguard_jax import checkpointing, distributed, nonfinite
from normguard_jax.interrupts import StopFlag

Unit = Callable[[Any, int], tuple[Any, dict, Any]]
Hook = Callable[[int, Any, dict], None]


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How often the loop logs, samples and may stop (all counts of units).

    Attributes:
      total: units of the whole run.
      log_every: units between scalar logs.
      sample_every: units between sample grids (none at the last unit before the final grid).
      max_nonfinite: consecutive units with a skipped update that stop the run.
      unit_name: what a unit is called in messages ("step", "iteration").
      samples_at_start: write a grid of the initial state when the run starts from unit 0.
    """

    total: int
    log_every: int
    sample_every: int
    max_nonfinite: int
    unit_name: str = "step"
    samples_at_start: bool = False


def run(state: Any, unit: Unit, *, schedule: Schedule, manager, writer,
        meta: Callable[[int, int], dict], write_samples: Callable[[Any, int], None],
        skipped_before: int = 0, saved_step: Optional[int] = None,
        hooks: Iterable[Hook] = ()) -> Any:
    """Runs units from the state's position to ``schedule.total``; returns the final state.

    Args:
      state: the state to continue from (fresh or restored); its position is ``start``.
      unit: one unit of work (see the module docstring).
      schedule: the :class:`Schedule`.
      manager: the run's Orbax ``CheckpointManager`` (closed on return).
      writer: a clu ``MetricWriter`` (flushed on return).
      meta: ``(done, skipped_total) -> dict``, the JSON record saved with the checkpoint of
        unit ``done``.
      write_samples: ``(state, done) -> None``, writes a sample grid.
      skipped_before: skipped updates of the run before this call (from the checkpoint).
      saved_step: the step already checkpointed (a restored run's), so it is not saved twice.
      hooks: callables ``hook(done, state, metrics)`` run after every unit (tests simulate
        crashes with them).
    """
    start = int(_position(state))
    total = schedule.total
    from clu import periodic_actions  # noqa: PLC0415  (imports TensorFlow: see reporting)
    progress = periodic_actions.ReportProgress(num_train_steps=total, writer=writer,
                                               every_steps=schedule.log_every)
    skips = nonfinite.SkipCounter(schedule.max_nonfinite, schedule.unit_name,
                                  f"The last good checkpoint is in {manager.directory}.",
                                  total=skipped_before)
    saved = {"step": saved_step}

    def checkpoint(step: int, force: bool):
        if saved["step"] == step:
            return
        if checkpointing.save(manager, step, state, meta(step, skips.total), force=force):
            saved["step"] = step

    if schedule.samples_at_start and start == 0:
        write_samples(state, 0)
    done = start
    t0 = time.time()
    with StopFlag() as stop:
        try:
            for index in range(start, total):
                state, metrics, skipped = unit(state, index)
                done = index + 1
                progress(done)
                # One scalar read per unit; replicated, so every process takes the same branch.
                skipped = int(jax.device_get(skipped))
                if done % schedule.log_every == 0 or done == total or skipped:
                    scalars = dict(jax.device_get(metrics), skipped_total=skips.total + skipped)
                    writer.write_scalars(done, scalars)
                skips.record(done, skipped)
                for hook in hooks:
                    hook(done, state, metrics)
                checkpoint(done, force=False)
                if done % schedule.sample_every == 0 and done != total:
                    write_samples(state, done)
                if distributed.any_process(stop.requested):
                    logging.warning("%s: checkpointing %s %d and stopping.",
                                    "Ctrl-C" if stop.interrupted else "SIGTERM",
                                    schedule.unit_name, done)
                    checkpoint(done, force=True)
                    if stop.interrupted:
                        raise KeyboardInterrupt
                    break
            else:
                checkpoint(total, force=True)
                write_samples(state, total)
        except KeyboardInterrupt:
            if saved["step"] != done:
                logging.warning("Interrupted: checkpointing %s %d.", schedule.unit_name, done)
                try:
                    checkpoint(done, force=True)
                except Exception as e:  # noqa: BLE001 - e.g. interrupted inside a donating step
                    logging.warning("Could not checkpoint %s %d (%s); the run resumes from "
                                    "its last checkpoint.", schedule.unit_name, done, e)
            raise
        finally:
            manager.wait_until_finished()
            writer.flush()
    logging.info("Ran %ss %d..%d in %.1f s", schedule.unit_name, start, done, time.time() - t0)
    manager.close()
    return state


def _position(state) -> jax.Array:
    """The completed units of a state: ``step`` (pretraining) or ``iteration`` (RL)."""
    return state.step if hasattr(state, "step") else state.iteration
