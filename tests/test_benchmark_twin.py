"""The benchmark's pieces: PyTorch twins that compute what the JAX generators compute, the
analytic FLOP count behind its MFU figures, and the malloc re-exec of ``normguard_jax.main``.

The twin tests are skipped when torch is not installed (it is the optional ``bench`` extra).
Their parameters are the JAX initialisation plus Gaussian noise, so that the zero-initialised
output layers and gates (which make a freshly built model return exactly 0) do not hide a
mismatch. Agreement is required to 1e-5 relative to the output scale:
``max|v_jax - v_torch| <= 1e-5·max(1, max|v_jax|)``.
"""

import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks import run as bench_run  # imports torch lazily
from normguard_jax import flow, main, models, sampling

HAVE_TORCH = importlib.util.find_spec("torch") is not None
if HAVE_TORCH:
    import torch

    from benchmarks import torch_twin
needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="torch (the bench extra) not installed")

IMAGE_SHAPE = (8, 8, 2)
NUM_CLASSES = 5
TOL = 1e-5


def _tiny(name):
    """Tiny preset plus the options of the small presets (DiT stem, refiner, input skip)."""
    kw = dict(models.SIZES[name]["tiny"])
    if name == "dit":
        kw.update(refine_channels=8, input_skip=True, stem_channels=4)
    return kw


def _models(name):
    kw = _tiny(name)
    module = models.build_generator(name, image_shape=IMAGE_SHAPE, num_classes=NUM_CLASSES,
                                    rngs=nnx.Rngs(0), **kw)
    graphdef, params = models.split_generator(module)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [leaf + 0.1 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)]
    params = jax.tree.unflatten(treedef, leaves)
    twin = torch_twin.build_twin(name, image_shape=IMAGE_SHAPE, num_classes=NUM_CLASSES, **kw)
    torch_twin.load_jax_params(twin, params)
    return models.make_velocity_fn(graphdef), params, twin.eval()


def _nchw(a):
    return torch.from_numpy(np.array(a)).permute(0, 3, 1, 2)


def _nhwc(t):
    return t.permute(0, 2, 3, 1).numpy()


def _assert_close(ref, got):
    err = np.max(np.abs(ref - got))
    assert err <= TOL * max(1.0, np.max(np.abs(ref))), (err, np.max(np.abs(ref)))


@needs_torch
@pytest.mark.parametrize("name", ["unet", "dit"])
def test_every_parameter_is_loaded_and_not_trivial(name):
    _, params, twin = _models(name)
    # load_state_dict(strict=True) already failed on a missing or extra tensor; the counts and
    # the non-zero output layers confirm the noise reached every tensor.
    assert sum(p.numel() for p in twin.parameters()) == models.count_params(params)
    assert all(float(p.detach().abs().max()) > 0 for p in twin.parameters())


@needs_torch
@pytest.mark.parametrize("name", ["unet", "dit"])
def test_forward_matches_jax(name):
    velocity, params, twin = _models(name)
    x = jax.random.normal(jax.random.key(2), (5, *IMAGE_SHAPE))
    sigma = jnp.array([1.0, 0.7, 0.3, 0.01, 0.0], jnp.float32)
    cond = jnp.array([0, 1, 4, 2, NUM_CLASSES], jnp.int32)       # includes the null class
    v_jax = np.asarray(jax.jit(velocity)(params, x, sigma, cond))
    with torch.no_grad():
        v_torch = _nhwc(twin(_nchw(x), torch.from_numpy(np.array(sigma)),
                             torch.from_numpy(np.array(cond)).long()))
    assert np.max(np.abs(v_jax)) > 0.1          # a real, non-zero output is being compared
    _assert_close(v_jax, v_torch)


@needs_torch
@pytest.mark.parametrize("name", ["unet", "dit"])
def test_ten_step_guided_sample_matches_jax(name):
    velocity, params, twin = _models(name)
    labels = jnp.array([0, 1, 2, 3], jnp.int32)
    key = jax.random.key(3)
    x_jax = np.asarray(sampling.generate_images(
        velocity, params, labels, key, image_shape=IMAGE_SHAPE, num_steps=10, shift=3.0,
        guidance_scale=1.5, null_class=NUM_CLASSES))
    noise = sampling.initial_noise(jax.random.fold_in(key, 0), 4, IMAGE_SHAPE)
    with torch.no_grad():
        x_torch = _nhwc(torch_twin.euler_sample(
            twin, _nchw(noise), torch.from_numpy(np.array(labels)).long(),
            flow.inference_sigmas(10, 3.0), guidance_scale=1.5, null_class=NUM_CLASSES))
    # The sample moved away from its noise, and the two frameworks agree on where it went.
    assert np.max(np.abs(x_jax - np.asarray(noise))) > 0.1
    _assert_close(x_jax, x_torch)


@needs_torch
def test_state_dict_layouts():
    """Linear kernels are transposed, conv kernels go HWIO -> OIHW, scales become weights."""
    params = {"lin": {"kernel": np.arange(6.0).reshape(2, 3), "bias": np.zeros(3)},
              "conv": {"kernel": np.arange(24.0).reshape(1, 2, 3, 4)},
              "norm": {"scale": np.ones(4)}}
    state = torch_twin.jax_params_to_state_dict(params)
    assert set(state) == {"lin.weight", "lin.bias", "conv.weight", "norm.weight"}
    np.testing.assert_array_equal(state["lin.weight"].numpy(), params["lin"]["kernel"].T)
    conv = state["conv.weight"].numpy()
    assert conv.shape == (4, 3, 1, 2)
    # element [o, i, h, w] of the torch kernel is element [h, w, i, o] of the JAX kernel
    assert conv[3, 2, 0, 1] == params["conv"]["kernel"][0, 1, 2, 3]


def test_flop_count_closed_forms():
    """2·M·N·K per matmul, 2·|out|·kh·kw·C_in per conv, ×3 with both gradients, ×length in scan."""
    a, b = jnp.ones((3, 4, 5)), jnp.ones((3, 5, 6))
    assert bench_run.count_matmul_flops(
        jax.make_jaxpr(lambda a, b: jnp.einsum("bij,bjk->bik", a, b))(a, b)) == 2 * 3 * 4 * 5 * 6
    x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 7))

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    forward = 2 * (2 * 8 * 8 * 7) * (3 * 3 * 3)
    assert bench_run.count_matmul_flops(jax.make_jaxpr(conv)(x, w)) == forward
    grads = jax.grad(lambda x, w: conv(x, w).sum(), argnums=(0, 1))
    assert bench_run.count_matmul_flops(jax.make_jaxpr(grads)(x, w)) == 3 * forward
    # The generators' conv (models/conv.py: per-tap kernel gradient) does the same work.
    from normguard_jax.models import conv as model_conv

    def tap_conv(x, w):
        return model_conv.conv_general_dilated(x, w, (1, 1), "SAME",
                                               dimension_numbers=("NHWC", "HWIO", "NHWC"))

    tap_grads = jax.grad(lambda x, w: tap_conv(x, w).sum(), argnums=(0, 1))
    assert bench_run.count_matmul_flops(jax.make_jaxpr(tap_grads)(x, w)) == 3 * forward

    def repeated(x, w):
        return jax.lax.scan(lambda c, _: (conv(c, w[..., :3]), None), x, None, length=4)[0]

    assert bench_run.count_matmul_flops(jax.make_jaxpr(jax.jit(repeated))(x, w)) == (
        4 * 2 * (2 * 8 * 8 * 3) * 27)


@pytest.mark.slow  # each subprocess imports normguard_jax.main (absl, clu, TensorFlow)
@pytest.mark.parametrize("opt_out", [False, True])
def test_main_reexecs_with_tuned_malloc(opt_out):
    """The entry restarts itself once with GLIBC_TUNABLES set, unless opted out or already set."""
    code = ("import os; from normguard_jax import main; main._reexec_with_tuned_malloc(); "
            "print(os.getpid(), os.environ.get('GLIBC_TUNABLES'))")
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", main.DEFAULT_MALLOC_ENV)}
    if opt_out:
        env[main.DEFAULT_MALLOC_ENV] = "1"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, check=True, timeout=120)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1                     # the first pass printed nothing: it was replaced
    assert lines[0].split()[1] == ("None" if opt_out else main.MALLOC_TUNING)
    assert bench_run.MALLOC_TUNING == main.MALLOC_TUNING
