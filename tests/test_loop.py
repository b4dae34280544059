"""The run loop: no device reads between logs, the skip window, and Orbax preemption notices."""

import logging
import threading
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from normguard_jax import checkpointing, loop, nonfinite, reporting


class _State(NamedTuple):
    step: jax.Array
    w: jax.Array


def _unit(bad_steps=()):
    """A device-only unit: ``w += 1`` unless the 1-based step is in ``bad_steps`` (skipped)."""
    bad = np.asarray(sorted(bad_steps) or [-1], np.int32)   # a host constant of the program

    @jax.jit
    def step(state):
        n = state.step + 1
        skip = jnp.any(bad == n)
        w = jnp.where(skip, state.w, state.w + 1.0)
        return _State(n, w), {"w": w[0], "skipped": skip.astype(jnp.float32)}

    def unit(state, index):
        del index
        state, metrics = step(state)
        return state, metrics, metrics["skipped"]
    return unit


def _run(tmp_path, unit, *, total, log_every, checkpoint_every=1000, max_nonfinite=3,
         patch=None, hooks=()):
    workdir = str(tmp_path / "run")
    manager = checkpointing.open_manager(workdir, save_interval_steps=checkpoint_every)
    if patch:
        patch(manager)
    writer = reporting.JsonlWriter(f"{workdir}/metrics.jsonl")
    schedule = loop.Schedule(total=total, log_every=log_every, sample_every=10**6,
                             max_nonfinite=max_nonfinite)
    state = _State(jnp.int32(0), jnp.zeros((2,), jnp.float32))
    try:
        return loop.run(state, unit, schedule=schedule, manager=manager, writer=writer,
                        meta=lambda step, skipped: {"skipped_updates": skipped},
                        write_samples=lambda s, d: None, hooks=hooks), workdir
    finally:
        manager.close()


class _ReadSpy:
    """Records every read of a jax Array that waits for the device (``int(x)``, ``float(x)``,
    ``bool(x)``, ``jax.device_get``, ``x.item()``, ``x.block_until_ready()``, formatting) made
    by the main thread outside the loop's sanctioned reads.

    ``jax.transfer_guard`` cannot do this here: on CPU a device buffer is host memory, so no
    transfer is ever guarded. For the same reason ``np.asarray(x)`` is not seen on CPU (numpy
    takes the buffer directly); the loop does not use it.
    """

    def __init__(self, monkeypatch):
        from jax._src import array  # noqa: PLC0415
        self.unit = 0              # the unit being run or just finished
        self.stray = []            # (what, unit) of reads outside the sanctioned functions
        self.sanctioned = []       # (what, unit) of the loop's own reads
        self._inside = 0
        cls = array.ArrayImpl
        value = cls.__dict__["_value"]
        monkeypatch.setattr(cls, "_value", property(
            lambda x: (self._note("_value"), value.__get__(x))[1]))
        for name in ("__array__", "item", "block_until_ready"):
            original = getattr(cls, name)
            monkeypatch.setattr(cls, name, self._noting(name, original))
        for owner, name in ((loop, "_fetch"), (nonfinite.DeviceSkipCounter, "read"),
                            (checkpointing, "save")):
            monkeypatch.setattr(owner, name, self._sanctioning(name, getattr(owner, name)))

    def _note(self, what):
        # Orbax's background thread, writing a checkpoint, does not hold up the loop.
        if not self._inside and threading.current_thread() is threading.main_thread():
            self.stray.append((what, self.unit))

    def _noting(self, what, original):
        def read(x, *args, **kwargs):
            self._note(what)
            return original(x, *args, **kwargs)
        return read

    def _sanctioning(self, what, original):
        def sanctioned(*args, **kwargs):
            self.sanctioned.append((what, self.unit))
            self._inside += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._inside -= 1
        return sanctioned


def test_the_loop_reads_the_device_only_at_logs_and_checkpoints(tmp_path, monkeypatch):
    unit = _unit(bad_steps=(2,))
    spy = _ReadSpy(monkeypatch)

    def watched(state, index):
        spy.unit = index + 1
        return unit(state, index)

    state, workdir = _run(tmp_path, watched, total=12, log_every=4, checkpoint_every=6)
    spy.unit = None
    assert spy.stray == [("_value", 0)]     # only the start position, before the first unit
    assert [u for what, u in spy.sanctioned if what == "_fetch"] == [4, 8, 12]
    # Orbax also saves the first step of a fresh run (its InitialSavePolicy).
    assert sorted({u for what, u in spy.sanctioned if what == "read"}) == [1, 4, 6, 8, 12]
    assert [u for what, u in spy.sanctioned if what == "save"] == [1, 6, 12]
    assert int(state.step) == 12 and float(state.w[0]) == 11.0     # one update skipped
    rows = reporting.read_jsonl(f"{workdir}/metrics.jsonl")
    logged = [(r["step"], r["skipped_total"]) for r in rows if "skipped_total" in r]
    assert logged == [(4, 1.0), (8, 1.0), (12, 1.0)]
    assert checkpointing.read_meta(workdir, 6)[1] == {"skipped_updates": 1}


def test_the_read_spy_sees_each_kind_of_read(monkeypatch):
    """The spy of the test above records the reads a loop could make, e.g. the per-unit
    ``int(jax.device_get(skipped))`` the loop used to make."""
    spy = _ReadSpy(monkeypatch)
    reads = [lambda x: int(jax.device_get(x)), int, bool, float, lambda x: x.item(),
             lambda x: x.block_until_ready(), lambda x: f"{x:.1f}", lambda x: x.tolist()]
    for i, read in enumerate(reads):
        spy.unit = i
        read(jax.jit(lambda: jnp.float32(1))())
    assert sorted({u for _, u in spy.stray}) == list(range(len(reads)))


@pytest.mark.parametrize("log_every, bad, window, found", [
    (1, (3, 4, 6, 7, 8, 9), "steps 6..8)", None),      # found at once, as before
    (4, (5, 6, 7), "steps 5..7)", 8),                  # found at the next log
    (4, (2, 3, 5, 6, 7, 9), "steps 5..7)", 8),         # the first window, not a later one
])
def test_nonfinite_error_names_the_window_and_no_checkpoint_follows_it(
        tmp_path, log_every, bad, window, found):
    seen = []
    with pytest.raises(nonfinite.NonFiniteError) as error:
        _run(tmp_path, _unit(bad), total=16, log_every=log_every, checkpoint_every=2,
             hooks=[lambda done, s, m: seen.append(done)])
    message = str(error.value)
    assert message.startswith(f"3 consecutive steps with non-finite values ({window}")
    assert (f"(found at step {found})" in message) is (found is not None)
    last = int(window.split("..")[1].rstrip(")"))
    stopped = found or last
    assert seen == list(range(1, stopped))            # stopped at the read, before the hooks
    saved = checkpointing.steps(str(tmp_path / "run"))
    first = int(window.split()[1].split("..")[0])
    assert saved and max(saved) < stopped
    # The newest checkpoint holds the parameters from before the window's first step.
    _, meta = checkpointing.read_meta(str(tmp_path / "run"))
    assert meta["skipped_updates"] == sum(1 for b in bad if b <= max(saved))
    assert max(saved) >= first - 1


def test_device_skip_counter_matches_the_host_counter():
    rng = np.random.default_rng(0)
    for _ in range(5):
        pattern = rng.integers(0, 3, size=20) * (rng.random(20) < 0.5)
        host = nonfinite.SkipCounter(3, "step", total=2)
        device = nonfinite.DeviceSkipCounter(3, "step", total=2)
        expected = None
        for i, k in enumerate(pattern, start=1):
            device.record(i, jnp.asarray(k) if i % 2 else int(k))
            if expected is None:
                try:
                    host.record(i, int(k))
                except nonfinite.NonFiniteError as e:
                    expected = str(e)
        assert device.read(20) == 2 + int(pattern.sum())
        if expected is None:
            device.check()
        else:
            with pytest.raises(nonfinite.NonFiniteError) as error:
                device.check()
            assert str(error.value) == expected.replace(
                "; parameters", " (found at step 20); parameters") or str(error.value) == expected


def test_a_preemption_notice_checkpoints_that_step_and_stops_like_sigterm(tmp_path, caplog):
    def preempt_at_5(manager):
        manager.reached_preemption = lambda step: step == 5

    with caplog.at_level(logging.WARNING):
        state, workdir = _run(tmp_path, _unit(), total=12, log_every=4, checkpoint_every=4,
                              patch=preempt_at_5)
    assert int(state.step) == 5                       # returned normally, like SIGTERM
    assert checkpointing.steps(workdir) == [1, 4, 5]   # 1: Orbax's first save
    assert any("preemption notice: checkpointing step 5 and stopping" in r.getMessage()
               for r in caplog.records)
    restored = checkpointing.restore_state(checkpointing.directory(workdir), 5, state)
    assert int(restored.step) == 5 and float(restored.w[0]) == 5.0
