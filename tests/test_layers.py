"""``layers.conv_general_dilated``: the convolution every ``Conv2d`` runs, whose CPU gradient
is computed by plain NHWC convolutions (fast inside loops on XLA:CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from didr_jax.models import layers
from didr_jax.parallel import mesh as mesh_lib
from didr_jax.train import common


@pytest.mark.parametrize("stride,padding,kernel,size", [
    (1, 1, 3, 8), (2, 1, 3, 8), (2, ((0, 1), (0, 1)), 3, 9), (1, 0, 1, 5), (2, 1, 3, 7),
    (1, ((2, 0), (1, 2)), 3, 6)])
def test_conv_cotangents_equal_jaxs_transpose_rules(stride, padding, kernel, size):
  """Both cotangents of the custom-VJP convolution against the gradient of the plain lax
  convolution (JAX's transpose rules), in float64, on strides, asymmetric paddings and 1x1."""
  with jax.enable_x64(True):
    conv = layers.Conv2d(3, 4, kernel, stride, padding, rngs=nnx.Rngs(0), dtype=jnp.float64,
                         param_dtype=jnp.float64)
    assert conv.conv_general_dilated is layers.conv_general_dilated
    graph, params = nnx.split(conv)
    x = jax.random.normal(jax.random.key(0), (2, size, size + 1, 3), jnp.float64)
    dy = jax.random.normal(jax.random.key(1), conv(x).shape, jnp.float64)

    def loss(params, x, plain):
      m = nnx.merge(graph, params)
      if plain:
        m.conv_general_dilated = jax.lax.conv_general_dilated
      return jnp.sum(m(x) * dy)

    ours = jax.grad(loss, (0, 1))(params, x, False)
    ref = jax.grad(loss, (0, 1))(params, x, True)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
      assert a.dtype == jnp.float64
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)
    # and the custom rule is the one in use on this backend (its jaxpr holds a custom_vjp)
    assert "custom_vjp_call" in str(jax.make_jaxpr(lambda p: loss(p, x, False))(params))


def test_conv_gradient_in_a_loop_keeps_plain_convolutions():
  """XLA:CPU compiles the gradient of a convolution inside a scan body to convolutions in the
  canonical NHWC x HWIO -> NHWC form only (no relabelled batch / feature dimensions, which it
  would emit as slow naive loops)."""
  conv = layers.Conv2d(8, 8, 3, rngs=nnx.Rngs(0))
  graph, params = nnx.split(conv)
  xs = jax.random.normal(jax.random.key(0), (2, 2, 8, 8, 8))

  def accumulate(params, xs):  # the trainers' gradient accumulation loop
    loss = lambda p, x: jnp.sum(nnx.merge(graph, p)(x) ** 2)
    return common.accumulate(lambda i: jax.grad(loss)(params, xs[i]), xs.shape[0])

  hlo = jax.jit(accumulate).lower(params, xs).compile().as_text()
  assert "while" in hlo
  labels = set(part.split(",")[0] for part in hlo.split("dim_labels=")[1:])
  assert labels == {"b01f_01io->b01f"}, labels


def _attention_f64(q, k, v, mask, scale):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  s = np.einsum("bqnh,bknh->bnqk", q, k) * scale
  if mask is not None:
    s = np.where(np.broadcast_to(mask, s.shape), s, -1e300)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bnqk,bknh->bqnh", p, v)


@pytest.mark.parametrize("mask_kind", [None, "keys", "causal"])
@pytest.mark.parametrize("block", [64, 1 << 20])  # 8 query blocks of 4 / one block
def test_blocked_attention_equals_float64_and_jax(mask_kind, block):
  """``blocked_attention`` against float64 NumPy (outputs) and ``jax.nn.dot_product_attention``
  (outputs and the gradients of all three inputs), with key-padding and causal masks, in
  several query blocks and in one."""
  b, t, tk, n, h = 2, 32, 24, 3, 4
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (b, t, n, h))
  k, v = (jax.random.normal(kk, (b, tk, n, h)) for kk in ks[1:3])
  mask = None
  if mask_kind == "keys":
    mask = (jnp.arange(tk)[None, :] < jnp.array([[tk], [tk - 7]]))[:, None, None, :]
  elif mask_kind == "causal":
    mask = (jnp.arange(tk)[None, :] <= jnp.arange(t)[:, None])[None, None]
  ours = lambda q, k, v: layers.blocked_attention(q, k, v, mask=mask, scale=0.3, block=block)
  ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, scale=0.3)
  np.testing.assert_allclose(np.asarray(ours(q, k, v)), _attention_f64(q, k, v, mask, 0.3),
                             rtol=1e-5, atol=1e-6)
  dy = jax.random.normal(ks[3], q.shape)
  g_ours = jax.grad(lambda *a: jnp.sum(ours(*a) * dy), (0, 1, 2))(q, k, v)
  g_ref = jax.grad(lambda *a: jnp.sum(ref(*a) * dy), (0, 1, 2))(q, k, v)
  for a, r in zip(g_ours, g_ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-4, atol=1e-5)
  if block == 64:  # really blocked: a loop over the 8 query blocks in the program
    assert "while" in jax.jit(ours).lower(q, k, v).as_text()


def test_attention_on_cpu_is_blocked_and_keeps_bfloat16():
  q = jax.random.normal(jax.random.key(0), (2, 16, 2, 8), jnp.bfloat16)
  out = layers.attention(q, q, q)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), _attention_f64(q, q, q, None, 8 ** -0.5),
                             atol=2e-2)
  jaxpr = str(jax.make_jaxpr(lambda q: layers.attention(q, q, q))(q))
  assert "dot_product_attention" not in jaxpr and "exp" in jaxpr


def test_programs_for_another_platform_take_its_forms():
  """The CPU-only forms (blocked attention, the convolution's custom gradient: both custom
  VJPs) follow the platform of the mesh a program is traced for (``layers.activation_sharding``),
  not the host's backend: a program compiled ahead of time for TPU chips on this CPU
  (``benchmarks/memory.py --topology``) takes the Pallas flash-attention kernel (XLA's
  ``jax.nn.dot_product_attention`` for a mask that is not a key mask) and lax's convolution."""
  import types
  q = jax.random.normal(jax.random.key(0), (1, 1024, 2, 8))  # 2^20 scores: flash's minimum
  w = jax.random.normal(jax.random.key(1), (3, 3, 8, 4))
  x = jax.random.normal(jax.random.key(2), (2, 6, 6, 8))

  causal = jnp.tril(jnp.ones((1024, 1024), bool))

  def forms(mesh):  # fresh functions: jax keeps traces per function
    attn = lambda q: layers.attention(q, q, q)
    masked = lambda q: layers.attention(q, q, q, mask=causal)
    conv = lambda x: layers.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    with layers.activation_sharding(mesh):
      a, m = str(jax.make_jaxpr(attn)(q)), str(jax.make_jaxpr(masked)(q))
      return (layers.platform(), "custom_vjp" in a and "pallas_call" not in a,
              "custom_vjp" in str(jax.make_jaxpr(conv)(x)),
              "pallas_call" in a, "pallas_call" in m)

  tpu = types.SimpleNamespace(size=1, devices=np.array([types.SimpleNamespace(platform="tpu")]))
  cpu = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  assert forms(cpu) == ("cpu", True, True, False, False)
  assert forms(None) == ("cpu", True, True, False, False)  # no mesh: the default backend
  # TPU: the Pallas flash kernel; a causal mask (not a key mask) takes XLA's form, and so do
  # fewer than 2^20 scores per head (a UNet's cross-attention to 77 text tokens)
  assert forms(tpu) == ("tpu", False, False, True, False)
  with layers.activation_sharding(tpu):
    short = str(jax.make_jaxpr(lambda q, k: layers.attention(q, k, k))(q, q[:, :77]))
  assert "pallas_call" not in short
  assert layers.platform() == "cpu"             # the context is left


@pytest.mark.parametrize("sharded", [False, True])
def test_flash_attention_matches_xla_attention(sharded):
  """``layers.flash_attention`` (the Pallas TPU kernel, run here by Pallas' TPU interpreter)
  against ``jax.nn.dot_product_attention``: values and all three gradients, with a key
  (padding) mask and sequence lengths that are not multiples of the kernel's 128 blocks; under
  an 8-device mesh, the program's form: the kernel per device under ``shard_map``."""
  from jax.experimental.pallas import tpu as pltpu
  b, tq, tk, n, h = 8, 40, 77, 2, 16
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(kq, (b, tq, n, h))
  k = jax.random.normal(kk, (b, tk, n, h))
  v = jax.random.normal(kv, (b, tk, n, h))
  mask = (jnp.arange(tk)[None, :] < jnp.arange(30, 30 + 5 * b, 5)[:, None])[:, None, None, :]
  mesh = mesh_lib.make_mesh((("data", -1), ("fsdp", 2), ("tensor", 2))) if sharded else None

  def loss(fn):
    def f(q, k, v):
      with layers.activation_sharding(mesh):
        out = fn(q, k, v)
      return (out * jnp.cos(out)).sum(), out
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))

  want = loss(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask))(q, k, v)
  flash = lambda q, k, v: layers.attention(q, k, v, mask=mask, implementation="flash")
  with pltpu.force_tpu_interpret_mode():
    if sharded:  # traced, not run: Pallas' TPU interpreter (jax 0.10.2) deadlocks in its
      # simulated devices when a kernel runs under shard_map on 8 CPU devices
      jaxpr = str(jax.make_jaxpr(lambda q: loss(flash)(q, k, v))(q))
      assert "shard_map" in jaxpr and jaxpr.count("pallas_call") >= 2  # forward, backward
      return
    got = loss(flash)(q, k, v)
  (_, out), grads = got
  (_, ref_out), ref_grads = want
  np.testing.assert_allclose(out, ref_out, rtol=0, atol=2e-6)
  for name, g, r in zip("qkv", grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=0, atol=2e-5, err_msg=f"d{name}")
