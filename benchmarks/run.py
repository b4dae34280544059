"""Speed and memory of the normguard_jax generators against their PyTorch twins.

One command (from the repository root, with the ``bench`` extra installed)::

    python -m benchmarks.run                      # UNet of configs/quickstart.py
    python -m benchmarks.run --models unet,dit    # also the DiT of configs/pretrain_mnist_dit.py

What it does. The command starts two child processes, one after the other, and prints the
ratios each measured:

* ``tuned``: glibc malloc tuned as ``normguard_jax.main`` sets it up
  (``GLIBC_TUNABLES=MALLOC_TUNING``, see below). Runs every section.
* ``default``: ``GLIBC_TUNABLES`` unset (glibc defaults). Runs the training-step section only,
  so the effect of the tuning is visible.

Inside a child every comparison is made in one process with the variants interleaved: each
round times every variant once, in turn, and the tables report medians over rounds (times)
and the median of the per-round ratios. PyTorch runs in the same process and therefore under
the same malloc settings. Everything is float32 on both sides.

Sections (per model):

* ``peak``: a 2048² float32 matmul in JAX and in PyTorch; the larger rate is the peak that
  every MFU below is measured against.
* ``sample``: 10-step Euler sampling (``flow.inference_sigmas(10, 3)``) of 64 images with
  classifier-free guidance 1.5 (one model call on 128 rows per step): JAX ``lax.scan`` inside
  ``jax.jit`` (``sampling.generate_images``) vs PyTorch eager vs ``torch.compile`` of the model.
* ``train``: one flow-matching regression step (fixed batch of x0, noise, σ, labels; global
  norm clip 1 + AdamW, the library's optimizer chain) at the pretraining batch size: JAX one
  step per jit call, JAX ``STEPS_PER_CALL`` steps per call (unrolled ``lax.scan``), JAX with
  rematerialised blocks (``remat=True``), PyTorch eager, ``torch.compile`` of the loss.
* ``normguard``: one RL update (``rl.update``: value_and_grad + optimizer) of DiffusionNFT on
  32 rows. With the KL term (the objective computes v_ref): NormGuard λ=0.1 vs λ=0. Without it
  (kl_weight=0, the objective does not compute v_ref): NormGuard λ=0.1 vs the bare objective.
* ``compile``: first compile of the sampler and of the train step (trace+lower, XLA compile),
  measured cold (a fresh persistent-cache directory); ``torch.compile`` first calls for
  reference.
* ``memory``: ``compiled.memory_analysis()`` of the train step with and without remat, and of
  the sampler; minor page faults per train-step call (the pages XLA:CPU's temporaries fault in
  again after glibc returned them to the kernel); the process's peak RSS.

FLOPs are counted analytically from the jaxpr (2·M·N·K for every ``dot_general`` and the
equivalent for every convolution, scan bodies times their length; element-wise work is not
counted), on the program without rematerialisation. MFU = FLOPs / time / peak.

Timings on a shared machine are upper bounds; run it on an idle machine for the figures.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from normguard_jax.main import MALLOC_TUNING  # the glibc malloc settings main.py runs under

# Train steps per JAX call in the multi-step variant (an unrolled lax.scan: XLA:CPU runs the
# convolutions of a rolled while-loop body far slower, 9 s instead of 0.55 s per step here).
STEPS_PER_CALL = 2
IMAGE_SHAPE = (32, 32, 1)
NUM_CLASSES = 10
# model name -> (preset, pretraining batch size of its config file)
MODELS = {"unet": ("small", 128), "dit": ("small", 64)}
SAMPLE_BATCH, SAMPLE_STEPS, GUIDANCE, SHIFT = 64, 10, 1.5, 3.0
RL_BATCH = 32
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------------------------


def count_matmul_flops(jaxpr) -> float:
    """FLOPs of every dot_general and convolution in a (closed) jaxpr, sub-jaxprs included.

    A dot contributes 2·|out|·(contracted size); a convolution 2·|out|·|kernel|/(output
    features). ``scan`` bodies count ``length`` times, ``cond`` its most expensive branch.
    """
    from jax.extend import core  # noqa: PLC0415

    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            k = 1
            for d in lhs_contract:
                k *= lhs[d]
            total += 2.0 * _size(eqn.outvars[0].aval.shape) * k
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
            total += 2.0 * _size(eqn.outvars[0].aval.shape) * _size(rhs) / out_features
        subs = []
        for value in eqn.params.values():
            if isinstance(value, (core.Jaxpr, core.ClosedJaxpr)):
                subs.append(value)
            elif isinstance(value, (tuple, list)) and value and all(
                    isinstance(v, (core.Jaxpr, core.ClosedJaxpr)) for v in value):
                subs.append(max(value, key=count_matmul_flops))
        factor = eqn.params["length"] if name == "scan" else 1
        total += factor * sum(count_matmul_flops(s) for s in subs)
    return total


def _size(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def interleave(variants: dict, rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Times each ``variants[name]()`` once per round, in turn; returns name -> times (s)."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times = {name: [] for name in variants}
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            t = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - t)
    return times


def ratio(times: dict, num: str, den: str) -> float:
    """Median over rounds of times[num][r] / times[den][r]."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def med(values) -> float:
    return statistics.median(values)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Sections (run inside a child process).
# ----------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, model_name: str, rounds: int):
        import jax  # noqa: PLC0415
        import torch  # noqa: PLC0415
        from flax import nnx  # noqa: PLC0415

        from benchmarks import torch_twin  # noqa: PLC0415
        from normguard_jax import models  # noqa: PLC0415
        from normguard_jax.models import conv as model_conv  # noqa: PLC0415

        self.jax, self.torch, self.tt = jax, torch, torch_twin
        self.name, self.rounds = model_name, rounds
        size, self.train_batch = MODELS[model_name]
        self.size_kwargs = models.SIZES[model_name][size]
        module = models.init_module(lambda: models.build_generator(
            model_name, image_shape=IMAGE_SHAPE, num_classes=NUM_CLASSES, rngs=nnx.Rngs(0),
            **self.size_kwargs))
        graphdef, params = models.split_generator(module)
        # Perturbed so that no layer is exactly zero (a trained model has no zero layers).
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(1), len(leaves))
        self.params = jax.tree.unflatten(treedef, [
            l + 0.02 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])
        self.graphdef = graphdef
        self.velocity = models.make_velocity_fn(graphdef)
        self.num_params = models.count_params(self.params)
        remat_module = models.init_module(lambda: models.build_generator(
            model_name, image_shape=IMAGE_SHAPE, num_classes=NUM_CLASSES, rngs=nnx.Rngs(0),
            remat=True, **self.size_kwargs), abstract=True)
        self.velocity_remat = models.make_velocity_fn(models.split_generator(remat_module)[0])
        # The same generator with XLA's own kernel-gradient convolution (models/conv.py
        # replaces it by per-tap products): layers built while conv_layer's function is lax's.
        original = model_conv.conv_general_dilated
        model_conv.conv_general_dilated = jax.lax.conv_general_dilated
        try:
            xla_module = models.init_module(lambda: models.build_generator(
                model_name, image_shape=IMAGE_SHAPE, num_classes=NUM_CLASSES,
                rngs=nnx.Rngs(0), **self.size_kwargs), abstract=True)
        finally:
            model_conv.conv_general_dilated = original
        self.velocity_xla_conv = models.make_velocity_fn(models.split_generator(xla_module)[0])

    def twin(self):
        t = self.tt.build_twin(self.name, image_shape=IMAGE_SHAPE, num_classes=NUM_CLASSES,
                               **self.size_kwargs)
        return self.tt.load_jax_params(t, self.params)

    # -- peak ----------------------------------------------------------------------------------

    def peak(self) -> dict:
        jax, torch = self.jax, self.torch
        n = 2048
        a = jax.random.normal(jax.random.key(0), (n, n))
        b = jax.random.normal(jax.random.key(1), (n, n))
        mm = jax.jit(lambda x, y: x @ y)
        ta, tb = torch.randn(n, n), torch.randn(n, n)
        times = interleave({"jax": lambda: mm(a, b).block_until_ready(),
                            "torch": lambda: torch.mm(ta, tb)}, max(self.rounds, 5))
        flops = 2.0 * n ** 3
        out = {f"{k}_gflops": flops / min(v) / 1e9 for k, v in times.items()}
        out["peak_gflops"] = max(out.values())
        return out

    # -- sampling ------------------------------------------------------------------------------

    def sample_program(self):
        """``(sample_fn, labels, key)``: the timed sampler ``(params, labels, key) -> images``
        (SAMPLE_BATCH, H, W, C), SAMPLE_STEPS Euler steps with CFG GUIDANCE, and its inputs."""
        jax = self.jax
        import jax.numpy as jnp  # noqa: PLC0415

        from normguard_jax import sampling  # noqa: PLC0415

        def sample_fn(params, labels, key):
            return sampling.generate_images(
                self.velocity, params, labels, key, image_shape=IMAGE_SHAPE,
                num_steps=SAMPLE_STEPS, shift=SHIFT, guidance_scale=GUIDANCE,
                null_class=NUM_CLASSES)

        labels = jnp.arange(SAMPLE_BATCH, dtype=jnp.int32) % NUM_CLASSES
        return sample_fn, labels, jax.random.key(5)

    def sample(self, peak_gflops: float) -> dict:
        jax, torch, tt = self.jax, self.torch, self.tt

        from normguard_jax import flow, sampling  # noqa: PLC0415

        sample_fn, labels, key = self.sample_program()
        t0 = time.perf_counter()
        lowered = jax.jit(sample_fn).lower(self.params, labels, key)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        compiled(self.params, labels, key).block_until_ready()
        t3 = time.perf_counter()
        flops = count_matmul_flops(jax.make_jaxpr(sample_fn)(self.params, labels, key))
        mem = compiled.memory_analysis()

        twin = self.twin().eval()
        twin_c = torch.compile(self.twin().eval())
        x0 = torch.from_numpy(
            __import__("numpy").array(sampling.initial_noise(
                jax.random.fold_in(key, 0), SAMPLE_BATCH, IMAGE_SHAPE))).permute(0, 3, 1, 2)
        x0 = x0.contiguous()
        lt = torch.from_numpy(__import__("numpy").array(labels)).long()
        sig = flow.inference_sigmas(SAMPLE_STEPS, SHIFT)

        def torch_sample(model):
            with torch.inference_mode():
                return tt.euler_sample(model, x0, lt, sig, guidance_scale=GUIDANCE,
                                       null_class=NUM_CLASSES)

        t4 = time.perf_counter()
        torch_sample(twin_c)
        torch_compile_s = time.perf_counter() - t4
        log(f"[{self.name}] sample: compiled both; timing {self.rounds} rounds")
        times = interleave({
            "jax": lambda: compiled(self.params, labels, key).block_until_ready(),
            "torch_eager": lambda: torch_sample(twin),
            "torch_compile": lambda: torch_sample(twin_c),
        }, self.rounds)
        t_jax = med(times["jax"])
        return {
            "times_s": {k: med(v) for k, v in times.items()},
            "speedup_vs_eager": ratio(times, "torch_eager", "jax"),
            "speedup_vs_compile": ratio(times, "torch_compile", "jax"),
            "gflop": flops / 1e9,
            "jax_mfu": flops / t_jax / 1e9 / peak_gflops,
            "images_per_s": {k: SAMPLE_BATCH / med(v) for k, v in times.items()},
            "compile": {"trace_lower_s": t1 - t0, "xla_compile_s": t2 - t1,
                        "first_call_total_s": t3 - t0, "torch_compile_first_call_s":
                        torch_compile_s},
            "memory": {"temp_mib": mem.temp_size_in_bytes / 2**20},
        }

    # -- training ------------------------------------------------------------------------------

    def _batches(self, k: int):
        jax = self.jax
        import jax.numpy as jnp  # noqa: PLC0415

        from normguard_jax import flow  # noqa: PLC0415

        key = jax.random.key(7)
        b = self.train_batch
        shape = (k, b, *IMAGE_SHAPE)
        return {
            "x0": jnp.clip(jax.random.normal(jax.random.fold_in(key, 0), shape) * 0.5, -1, 1),
            "noise": jax.random.normal(jax.random.fold_in(key, 1), shape),
            "sigma": flow.logit_normal_sigmas(jax.random.fold_in(key, 2), k * b).reshape(k, b),
            "cond": jax.random.randint(jax.random.fold_in(key, 3), (k, b), 0, NUM_CLASSES + 1),
        }

    def _jax_train(self, velocity, steps_per_call: int, compiler_options=None):
        """``(call, trace+lower s, compile s, memory analysis, matmul FLOPs per step)`` of a
        jitted train step; ``call()`` runs one call and blocks. ``compiler_options`` go to
        XLA (``Lowered.compile``)."""
        jax = self.jax
        import optax  # noqa: PLC0415

        from normguard_jax.objectives.base import Context  # noqa: PLC0415
        from normguard_jax.objectives.flow_matching import flow_matching_loss  # noqa: PLC0415

        opt = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adamw(1e-4, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0))
        ctx = Context(velocity=velocity)

        def one(carry, batch):
            params, opt_state = carry
            (loss, _), grads = jax.value_and_grad(flow_matching_loss, has_aux=True)(
                params, batch, ctx)
            updates, opt_state = opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        if steps_per_call == 1:
            def step(params, opt_state, batches):
                batch = jax.tree.map(lambda a: a[0], batches)
                (params, opt_state), loss = one((params, opt_state), batch)
                return params, opt_state, loss
        else:
            def step(params, opt_state, batches):
                (params, opt_state), loss = jax.lax.scan(one, (params, opt_state), batches,
                                                     unroll=True)
                return params, opt_state, loss

        batches = self._batches(steps_per_call)
        params = jax.tree.map(lambda a: a.copy(), self.params)
        opt_state = opt.init(params)
        t0 = time.perf_counter()
        lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, batches)
        t1 = time.perf_counter()
        compiled = lowered.compile(compiler_options=compiler_options)
        t2 = time.perf_counter()
        state = [params, opt_state]

        def call():
            state[0], state[1], loss = compiled(state[0], state[1], batches)
            loss.block_until_ready()

        flops = count_matmul_flops(jax.make_jaxpr(step)(params, opt_state, batches))
        return call, t1 - t0, t2 - t1, compiled.memory_analysis(), flops / steps_per_call

    def _torch_train(self, compiled: bool):
        torch = self.torch
        import numpy as np  # noqa: PLC0415

        model = self.twin().train()
        try:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.99), eps=1e-8,
                                    weight_decay=0.0, fused=True)
        except (RuntimeError, TypeError):
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.99), eps=1e-8,
                                    weight_decay=0.0, foreach=True)
        batches = self._batches(STEPS_PER_CALL)
        tb = {
            "x0": torch.from_numpy(np.array(batches["x0"])).permute(0, 1, 4, 2, 3).contiguous(),
            "noise": torch.from_numpy(np.array(batches["noise"])).permute(
                0, 1, 4, 2, 3).contiguous(),
            "sigma": torch.from_numpy(np.array(batches["sigma"])),
            "cond": torch.from_numpy(np.array(batches["cond"])).long(),
        }

        def loss_fn(x0, noise, sigma, cond):
            s = sigma.view(-1, 1, 1, 1)
            v = model((1.0 - s) * x0 + s * noise, sigma, cond)
            return torch.mean(torch.square(v - (noise - x0)))

        fn = torch.compile(loss_fn) if compiled else loss_fn

        def steps(k: int):
            for i in range(k):
                loss = fn(tb["x0"][i], tb["noise"][i], tb["sigma"][i], tb["cond"][i])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()

        t = time.perf_counter()
        steps(1)
        return steps, time.perf_counter() - t

    def train(self, peak_gflops: float, full: bool) -> dict:
        k = STEPS_PER_CALL
        jax1, lower1, comp1, mem1, flops = self._jax_train(self.velocity, 1)
        jaxk, _, _, _, _ = self._jax_train(self.velocity, k)
        variants = {
            "jax_1_per_call": lambda: [jax1() for _ in range(k)],
            f"jax_{k}_per_call": jaxk,
        }
        out = {"gflop_per_step": flops / 1e9, "batch": self.train_batch,
               "compile": {"trace_lower_s": lower1, "xla_compile_s": comp1}}
        mem_remat = mem_xla_conv = None
        if full:
            jaxr, _, _, mem_remat, _ = self._jax_train(self.velocity_remat, 1)
            variants["jax_remat_1_per_call"] = lambda: [jaxr() for _ in range(k)]
            jaxx, _, _, mem_xla_conv, _ = self._jax_train(self.velocity_xla_conv, 1)
            variants["jax_xla_kernel_grad_1_per_call"] = lambda: [jaxx() for _ in range(k)]
        eager, _ = self._torch_train(compiled=False)
        comp, torch_first = self._torch_train(compiled=True)
        out["compile"]["torch_compile_first_step_s"] = torch_first
        variants["torch_eager"] = lambda: eager(k)
        variants["torch_compile"] = lambda: comp(k)
        # Page faults of one JAX call (after warm-up): temporaries faulted in again.
        for _ in range(3):  # the first calls grow the heap; later ones reuse it (if kept)
            jax1()
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        jax1()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        log(f"[{self.name}] train: compiled all; timing {self.rounds} rounds of {k} steps")
        times = interleave(variants, self.rounds)
        per_step = {name: med(v) / k for name, v in times.items()}
        # The remat and XLA-kernel-gradient variants are comparisons, not candidates.
        best_jax = min((n for n in per_step if n.startswith("jax_") and "remat" not in n
                        and "xla_kernel" not in n), key=per_step.get)
        out.update({
            "times_per_step_s": per_step,
            "best_jax": best_jax,
            "speedup_vs_eager": {n: ratio(times, "torch_eager", n) for n in per_step
                                 if n.startswith("jax")},
            "speedup_vs_compile": {n: ratio(times, "torch_compile", n) for n in per_step
                                   if n.startswith("jax")},
            "jax_mfu": {n: flops / per_step[n] / 1e9 / peak_gflops for n in per_step
                        if n.startswith("jax") and "remat" not in n},
            "minor_faults_mib_per_call": faults * resource.getpagesize() / 2**20,
        })

        def mib(m):
            return {"temp_mib": m.temp_size_in_bytes / 2**20,
                    "args_mib": m.argument_size_in_bytes / 2**20,
                    "output_mib": m.output_size_in_bytes / 2**20}

        out["memory"] = {"no_remat": mib(mem1)}
        if mem_remat is not None:
            out["memory"]["remat"] = mib(mem_remat)
            out["memory"]["xla_kernel_grad"] = mib(mem_xla_conv)
            out["tap_kernel_grad_speedup"] = ratio(times, "jax_xla_kernel_grad_1_per_call",
                                                   "jax_1_per_call")
        return out

    # -- NormGuard overhead --------------------------------------------------------------------

    def normguard(self) -> dict:
        jax = self.jax
        import optax  # noqa: PLC0415

        from normguard_jax import normguard, rl  # noqa: PLC0415
        from normguard_jax.objectives import nft  # noqa: PLC0415

        b = self._batches(1)
        batch = {k: v[0, :RL_BATCH] for k, v in b.items()}
        batch["cond"] = batch["cond"] % NUM_CLASSES
        batch["advantage"] = jax.random.normal(jax.random.key(9), (RL_BATCH,))
        opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-4))
        ref = self.params
        old = jax.tree.map(lambda a: a * 1.01, self.params)
        ok = self.jax.numpy.asarray(True)

        def make(kl: float, weight: float | None):
            obj = nft.make_objective(nft.NFTConfig(kl_weight=kl))
            if weight is not None:
                obj = normguard.with_normguard(obj, normguard.NormGuardConfig(weight=weight))
            fn = jax.jit(functools.partial(rl.update, objective=obj, optimizer=opt,
                                           velocity=self.velocity))
            params = jax.tree.map(lambda a: a * 1.02, self.params)
            state = [params, opt.init(params)]

            def call():
                state[0], state[1], m = fn(state[0], state[1], old, ref, batch, ok)
                m["loss"].block_until_ready()
            call()
            return call

        variants = {
            "kl_guard_0.1": make(1e-4, 0.1), "kl_guard_0": make(1e-4, 0.0),
            "kl_bare": make(1e-4, None),
            "nokl_guard_0.1": make(0.0, 0.1), "nokl_bare": make(0.0, None),
        }
        log(f"[{self.name}] normguard: compiled all; timing {3 * self.rounds} rounds")
        times = interleave(variants, 3 * self.rounds)
        return {
            "times_s": {k: med(v) for k, v in times.items()},
            "overhead_with_vref": ratio(times, "kl_guard_0.1", "kl_guard_0") - 1.0,
            "overhead_with_vref_vs_bare": ratio(times, "kl_guard_0.1", "kl_bare") - 1.0,
            "overhead_without_vref": ratio(times, "nokl_guard_0.1", "nokl_bare") - 1.0,
        }


def child(args) -> None:
    import jax  # noqa: PLC0415

    jax.config.update("jax_compilation_cache_dir", args.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    full = args.mode == "tuned"
    results = {"mode": args.mode, "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
               "models": {}}
    import torch  # noqa: PLC0415
    results["versions"] = {"jax": jax.__version__, "torch": torch.__version__,
                           "torch_threads": torch.get_num_threads()}
    for name in args.models.split(","):
        bench = Bench(name, args.rounds)
        r = {"params": bench.num_params}
        log(f"[{args.mode}] {name}: peak")
        r["peak"] = bench.peak()
        peak = r["peak"]["peak_gflops"]
        if full:
            log(f"[{args.mode}] {name}: sample")
            r["sample"] = bench.sample(peak)
        log(f"[{args.mode}] {name}: train")
        r["train"] = bench.train(peak, full)
        if full:
            log(f"[{args.mode}] {name}: normguard")
            r["normguard"] = bench.normguard()
        results["models"][name] = r
    results["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)


# ----------------------------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------------------------


def report(tuned: dict, default: dict | None) -> str:
    lines = []
    add = lines.append
    for name, r in tuned["models"].items():
        s, t, g = r["sample"], r["train"], r["normguard"]
        add(f"## {name} ({r['params'] / 1e6:.2f}M parameters)")
        p = r["peak"]
        add(f"matmul peak (2048² f32): JAX {p['jax_gflops']:.0f} GFLOP/s, PyTorch "
            f"{p['torch_gflops']:.0f} GFLOP/s -> peak {p['peak_gflops']:.0f} GFLOP/s")
        add("")
        add("| measurement | value | target | met |")
        add("|---|---|---|---|")
        add(f"| sampling: JAX speed-up over PyTorch eager (time ratio) | "
            f"{s['speedup_vs_eager']:.2f}× | ≥ 2× | {_met(s['speedup_vs_eager'] >= 2)} |")
        add(f"| sampling: JAX speed-up over torch.compile | {s['speedup_vs_compile']:.2f}× | "
            "— | |")
        add(f"| sampling: JAX MFU | {100 * s['jax_mfu']:.0f} % | ≥ 50 % | "
            f"{_met(s['jax_mfu'] >= 0.5)} |")
        # What the 2× target asks: twice PyTorch eager's FLOP rate, as a fraction of the peak.
        eager_mfu = s["gflop"] / s["times_s"]["torch_eager"] / p["peak_gflops"]
        add(f"| sampling: PyTorch eager's MFU (so 2× eager needs {200 * eager_mfu:.0f} % MFU) | "
            f"{100 * eager_mfu:.0f} % | — | |")
        best = t["best_jax"]
        add(f"| train step ({best}): JAX speed-up over torch.compile | "
            f"{t['speedup_vs_compile'][best]:.2f}× | ≥ 1.25× | "
            f"{_met(t['speedup_vs_compile'][best] >= 1.25)} |")
        add(f"| train step ({best}): JAX speed-up over PyTorch eager | "
            f"{t['speedup_vs_eager'][best]:.2f}× | — | |")
        add(f"| train step ({best}): JAX MFU | {100 * t['jax_mfu'][best]:.0f} % | ≥ 40 % | "
            f"{_met(t['jax_mfu'][best] >= 0.4)} |")
        if "tap_kernel_grad_speedup" in t:
            add(f"| train step: per-tap kernel gradient (models/conv.py) over XLA's kernel-"
                f"gradient convolution | {t['tap_kernel_grad_speedup']:.2f}× | — | |")
        add(f"| NormGuard overhead per RL update, objective computes v_ref (NFT+KL, λ=0.1 vs 0)"
            f" | {100 * g['overhead_with_vref']:+.1f} % | ≤ 3 % | "
            f"{_met(g['overhead_with_vref'] <= 0.03)} |")
        add(f"| NormGuard overhead, objective without v_ref (NFT, λ=0.1 vs bare) | "
            f"{100 * g['overhead_without_vref']:+.1f} % | report | |")
        add(f"| compile, sampler (trace+lower + XLA) | {s['compile']['trace_lower_s']:.1f} + "
            f"{s['compile']['xla_compile_s']:.1f} s | ≤ 2 s | "
            f"{_met(s['compile']['trace_lower_s'] + s['compile']['xla_compile_s'] <= 2)} |")
        add(f"| compile, train step (trace+lower + XLA) | {t['compile']['trace_lower_s']:.1f} "
            f"+ {t['compile']['xla_compile_s']:.1f} s | ≤ 5 s | "
            f"{_met(t['compile']['trace_lower_s'] + t['compile']['xla_compile_s'] <= 5)} |")
        add("")
        add(f"Sampling, {SAMPLE_BATCH} images × {SAMPLE_STEPS} steps, CFG {GUIDANCE} "
            f"({s['gflop']:.1f} GFLOP): " + ", ".join(
                f"{n} {v:.3f} s" for n, v in s["times_s"].items())
            + f"; torch.compile first call {s['compile']['torch_compile_first_call_s']:.1f} s.")
        add(f"Train step, batch {t['batch']} ({t['gflop_per_step']:.1f} GFLOP), time per step:")
        add("")
        add("| variant | s/step | × vs eager | × vs compile | MFU |")
        add("|---|---|---|---|---|")
        for n, v in t["times_per_step_s"].items():
            ve = t["speedup_vs_eager"].get(n)
            vc = t["speedup_vs_compile"].get(n)
            mfu = t["jax_mfu"].get(n)
            add(f"| {n} (tuned malloc) | {v:.3f} | {_f(ve)} | {_f(vc)} | "
                f"{'' if mfu is None else f'{100 * mfu:.0f} %'} |")
        if default is not None and name in default["models"]:
            d = default["models"][name]["train"]
            for n, v in d["times_per_step_s"].items():
                mfu = d["jax_mfu"].get(n)
                add(f"| {n} (default malloc) | {v:.3f} | {_f(d['speedup_vs_eager'].get(n))} | "
                    f"{_f(d['speedup_vs_compile'].get(n))} | "
                    f"{'' if mfu is None else f'{100 * mfu:.0f} %'} |")
        add("")
        add(f"Page faults per JAX train-step call: {t['minor_faults_mib_per_call']:.0f} MiB "
            "(tuned malloc)" + (
                f", {default['models'][name]['train']['minor_faults_mib_per_call']:.0f} MiB "
                "(default malloc)" if default and name in default["models"] else "") + ".")
        m = t["memory"]
        add(f"XLA buffers of the train step: temporaries {m['no_remat']['temp_mib']:.0f} MiB "
            f"without remat, {m['remat']['temp_mib']:.0f} MiB with remat, "
            f"{m['xla_kernel_grad']['temp_mib']:.0f} MiB with XLA's kernel gradient (arguments "
            f"{m['no_remat']['args_mib']:.0f} MiB); sampler temporaries "
            f"{s['memory']['temp_mib']:.0f} MiB. torch.compile first train step "
            f"{t['compile']['torch_compile_first_step_s']:.1f} s.")
        add("NormGuard timings (s per update, batch 32): " + ", ".join(
            f"{n} {v:.4f}" for n, v in g["times_s"].items())
            + f"; λ=0.1 vs bare objective with v_ref: {100 * g['overhead_with_vref_vs_bare']:+.1f} %.")
        add("")
    add(f"Peak RSS: {tuned['max_rss_mib']:.0f} MiB (tuned child)"
        + (f", {default['max_rss_mib']:.0f} MiB (default child)" if default else "") + ".")
    add(f"Versions: {tuned['versions']}.")
    return "\n".join(lines)


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _f(x) -> str:
    return "" if x is None else f"{x:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="unet", help="comma-separated: unet, dit")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--json", default="", help="also write all results to this file")
    parser.add_argument("--skip-default", action="store_true",
                        help="do not run the default-malloc child")
    parser.add_argument("--mode", choices=["tuned", "default"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        child(args)
        return
    started = time.time()
    uptime_before = _uptime()
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for mode in (["tuned"] if args.skip_default else ["tuned", "default"]):
            env = dict(os.environ)
            env.pop("GLIBC_TUNABLES", None)
            if mode == "tuned":
                env["GLIBC_TUNABLES"] = MALLOC_TUNING
            env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
            out = os.path.join(tmp, f"{mode}.json")
            subprocess.run([sys.executable, "-m", "benchmarks.run", "--mode", mode,
                            "--out", out, "--cache-dir", os.path.join(tmp, "xla_cache"),
                            "--models", args.models, "--rounds", str(args.rounds)],
                           env=env, check=True, cwd=REPO)
            with open(out, encoding="utf-8") as f:
                results[mode] = json.load(f)
    results["load"] = {"uptime_before": uptime_before, "uptime_after": _uptime(),
                       "wall_s": time.time() - started}
    print(report(results["tuned"], results.get("default")))
    print(f"\nLoad: before `{uptime_before}`; after `{results['load']['uptime_after']}`; "
          f"wall {results['load']['wall_s']:.0f} s.")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


if __name__ == "__main__":
    main()
