"""The one run loop: pretraining and RL plug their unit of work (a step, an iteration) into it.

:func:`run` owns everything around the unit: the Orbax checkpoint manager, TPU preemption
notices, SIGTERM and Ctrl-C, the count of skipped (non-finite) updates, scalar logs with
progress (steps/s, ETA), fixed-seed sample grids, and the final save. What it guarantees:

- after unit ``n`` (1-based) a checkpoint at ``n`` is saved when ``n`` is a multiple of the
  manager's interval, and always at the end, on a preemption notice, on SIGTERM and on Ctrl-C
  (each step saved once);
- a preemption notice (Orbax's ``CheckpointManager.reached_preemption``: JAX's preemption sync
  point, which every process reaches at the same unit) checkpoints that unit and returns;
- SIGTERM checkpoints the last completed unit and returns; Ctrl-C lets the unit in progress
  finish, checkpoints it and raises ``KeyboardInterrupt`` (a second Ctrl-C, or one outside the
  loop's polling, raises at once after a best-effort checkpoint). With one process the signal
  is seen after the unit in progress; with several, the processes agree on it at the next
  log or checkpoint unit (a signal on any process stops all of them at the same unit);
- ``max_nonfinite`` units in a row with skipped updates stop the run with
  :class:`nonfinite.NonFiniteError` naming them; the checkpoints written so far hold the last
  good state;
- scalars (the unit's metrics and ``skipped_total``) are written every ``log_every`` units and
  at the end.

No host sync between logs: the loop reads nothing from the device except at log units,
checkpoints, sample grids and the end. The skip count stays on the device
(:class:`nonfinite.DeviceSkipCounter`) and is read at those points, so a run of skips long
enough to stop the run is found at the next of them (at once with ``log_every=1``), and a
checkpoint is never written after it. Between reads the host keeps dispatching units; the
runtime bounds how far it runs ahead of the device.

The unit is a function ``unit(state, index) -> (state, metrics, skipped)`` with ``index`` the
0-based unit about to run, ``metrics`` a dict of scalars (device arrays are fine) and ``skipped``
the number of updates it skipped (an int or a scalar array, never read on its own).
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
    skips = nonfinite.DeviceSkipCounter(schedule.max_nonfinite, schedule.unit_name,
                                        f"The last good checkpoint is in {manager.directory}.",
                                        total=skipped_before)
    saved = {"step": saved_step}
    several = jax.process_count() > 1

    def checkpoint(step: int, force: bool):
        if saved["step"] == step or not (force or manager.should_save(step)):
            return
        skipped_total = skips.read(step)
        skips.check()                      # no checkpoint after a stopping run of skips
        if checkpointing.save(manager, step, state, meta(step, skipped_total), force=force):
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
                skips.record(done, skipped)         # on the device: no transfer
                log = done % schedule.log_every == 0 or done == total
                if log:   # read first, so that progress times finished units
                    scalars = dict(_fetch(metrics), skipped_total=skips.read(done))
                    progress(done)
                    writer.write_scalars(done, scalars)
                    skips.check()
                else:
                    progress(done)
                for hook in hooks:
                    hook(done, state, metrics)
                # Host-side only (JAX's preemption sync point); every process agrees on it.
                preempted = manager.reached_preemption(done)
                checkpoint(done, force=preempted)
                if done % schedule.sample_every == 0 and done != total:
                    write_samples(state, done)
                stopping = stop.requested
                if several:   # agree at log and checkpoint units only: a gather waits for them
                    stopping = (log or saved["step"] == done) and distributed.any_process(
                        stopping)
                if preempted or stopping:
                    reason = ("preemption notice" if preempted else
                              "Ctrl-C" if stop.interrupted else "SIGTERM")
                    logging.warning("%s: checkpointing %s %d and stopping.", reason,
                                    schedule.unit_name, done)
                    checkpoint(done, force=True)
                    if stop.interrupted and not preempted:
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


def _fetch(tree: Any) -> Any:
    """The loop's one device-to-host read of a pytree (at log units)."""
    return jax.device_get(tree)


def _position(state) -> jax.Array:
    """The completed units of a state: ``step`` (pretraining) or ``iteration`` (RL)."""
    return state.step if hasattr(state, "step") else state.iteration
