"""``layers.conv_general_dilated``: the convolution every ``Conv2d`` runs, whose CPU gradient
is computed by plain NHWC convolutions (fast inside loops on XLA:CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from didr_jax.models import layers


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

  def accumulate(params, xs):
    def step(g, x):
      grad = jax.grad(lambda p: jnp.sum(nnx.merge(graph, p)(x) ** 2))(params)
      return jax.tree.map(jnp.add, g, grad), None
    return jax.lax.scan(step, jax.tree.map(jnp.zeros_like, params), xs)[0]

  hlo = jax.jit(accumulate).lower(params, xs).compile().as_text()
  assert "while" in hlo
  labels = set(part.split(",")[0] for part in hlo.split("dim_labels=")[1:])
  assert labels == {"b01f_01io->b01f"}, labels
