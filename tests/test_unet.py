"""Parity of ``didr_jax.models.unet`` with diffusers' UNet2DConditionModel (float32, CPU).

Each case builds the diffusers model from a tiny config, perturbs every parameter with noise
(so GroupNorm/LayerNorm affines and biases are not at their 1/0 initial values), converts it with
``load_torch_weights`` and compares outputs in NHWC.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from didr_jax.convert import core
from didr_jax.models.unet import (UNet2DConditionModel, UNetConfig, abstract_unet, export_unet,
                                  load_unet)
from didr_jax.parallel import mesh as mesh_lib

diffusers = pytest.importorskip("diffusers")

B, HW, T = 8, 16, 8

BASE = dict(sample_size=HW, in_channels=4, out_channels=4, block_out_channels=(32, 64),
            cross_attention_dim=32, norm_num_groups=8)
CONFIGS = {
    # SD 1.x: conv proj_in/proj_out, int attention_head_dim (= 4 heads), scalar timestep; plus
    # less common settings: scale_shift resnets, centred input, padding-0 downsampling,
    # 1x1 conv_in/conv_out, mish, sin-first time embedding with a frequency shift.
    "sd1": dict(BASE, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                attention_head_dim=4, resnet_time_scale_shift="scale_shift",
                center_input_sample=True, downsample_padding=0, conv_in_kernel=1,
                conv_out_kernel=1, act_fn="mish", flip_sin_to_cos=False, freq_shift=1),
    # SD 2.x: linear projections, per-block head counts, list layers_per_block and
    # cross_attention_dim, a mid scale factor and a text attention mask; plus nested
    # (per-layer) transformer depths and only_cross_attention in one block.
    "sd2": dict(BASE, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                layers_per_block=(1, 2), attention_head_dim=(2, 4), cross_attention_dim=(32, 32),
                use_linear_projection=True, mid_block_scale_factor=1.5, upcast_attention=True,
                transformer_layers_per_block=((1,), (1, 2)),
                reverse_transformer_layers_per_block=((2, 1, 1), (1, 2)),
                only_cross_attention=(False, True)),
    # SDXL: text_time addition embedding, transformer depth > 1, few groups.
    "sdxl": dict(BASE, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                 attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
                 use_linear_projection=True, norm_num_groups=4, addition_embed_type="text_time",
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8),
}
# Checked for structure only (parameter names and shapes): no mid block, all cross-attention.
NO_MID = dict(BASE, down_block_types=("CrossAttnDownBlock2D",) * 2,
              up_block_types=("CrossAttnUpBlock2D",) * 2, layers_per_block=2,
              attention_head_dim=2, mid_block_type=None)
TEXT_DIM = 16


def _torch_unet(cfg: dict, seed: int = 0):
  torch.manual_seed(seed)
  model = diffusers.UNet2DConditionModel(**cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


def _state_dict(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _convert(tmodel, dtype=jnp.float32, **kw) -> UNet2DConditionModel:
  """Our model with ``tmodel``'s weights (dtype as ``load_unet``'s default: same graph)."""
  kw["dtype"] = dtype
  abstract = abstract_unet(UNetConfig.from_diffusers(dict(tmodel.config)), **kw)
  return core.load_torch_weights(abstract, _state_dict(tmodel))


def _inputs(name: str, seed: int = 1) -> dict[str, np.ndarray]:
  r = np.random.default_rng(seed)
  x = {"sample": r.standard_normal((B, HW, HW, 4), np.float32),
       "timesteps": (np.float32(500.0) if name == "sd1"
                     else r.uniform(0, 1000, (B,)).astype(np.float32)),
       "context": r.standard_normal((B, T, 32), np.float32)}
  if name == "sd2":
    x["mask"] = (r.uniform(size=(B, T)) > 0.3).astype(np.float32)
    x["mask"][:, 0] = 1.0
  if name == "sdxl":
    x["text_embeds"] = r.standard_normal((B, TEXT_DIM), np.float32)
    x["time_ids"] = np.tile(np.array([[64, 48, 0, 8, 64, 64]], np.float32), (B, 1))
  return x


def _torch_forward(tmodel, x: dict) -> np.ndarray:
  t = x["timesteps"]
  kw = {}
  if "mask" in x:
    kw["encoder_attention_mask"] = torch.from_numpy(x["mask"])
  if "text_embeds" in x:
    kw["added_cond_kwargs"] = {"text_embeds": torch.from_numpy(x["text_embeds"]),
                               "time_ids": torch.from_numpy(x["time_ids"])}
  with torch.no_grad():
    out = tmodel(torch.from_numpy(x["sample"]).permute(0, 3, 1, 2),
                 float(t) if np.ndim(t) == 0 else torch.from_numpy(t),
                 torch.from_numpy(x["context"]), **kw).sample
  return out.permute(0, 2, 3, 1).numpy()


# Compile time dominates this module on a loaded 2-core CPU: skip XLA's expensive backend
# passes (same float32 math; only kernel speed, irrelevant at this size, suffers).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def _apply(graphdef, state, x):
  model = nnx.merge(graphdef, state)
  return model(x["sample"], x["timesteps"], x["context"], text_embeds=x.get("text_embeds"),
               time_ids=x.get("time_ids"), encoder_attention_mask=x.get("mask"))


def _run(model, x, shard=None):
  graphdef, state = nnx.split(model)
  return np.asarray(_apply(graphdef, state, x if shard is None else shard(x)).astype(jnp.float32))


def _errors(out, ref):
  err = float(np.abs(out - ref).max())
  return err, err / float(np.abs(ref).max())


@functools.lru_cache(maxsize=None)
def _case(name: str):
  """(torch model, our model, inputs, torch output, our output), built once per module run."""
  tmodel = _torch_unet(CONFIGS[name])
  model = _convert(tmodel)
  x = _inputs(name)
  return tmodel, model, x, _torch_forward(tmodel, x), _run(model, x)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_diffusers(name):
  _, _, _, ref, out = _case(name)
  abs_err, rel_err = _errors(out, ref)
  print(f"{name}: max abs err {abs_err:.2e}, rel {rel_err:.2e}, |ref| {np.abs(ref).max():.2f}")
  assert out.shape == ref.shape
  assert np.abs(ref).max() > 0.1  # a real signal, not a degenerate near-zero output
  assert rel_err < 1e-5


def test_config_parsing_quirks():
  cfg = UNetConfig.from_diffusers(CONFIGS["sd2"])
  # attention_head_dim means the number of heads unless num_attention_heads is given.
  assert cfg.num_attention_heads == (2, 4)
  assert UNetConfig.from_diffusers(dict(CONFIGS["sd1"], num_attention_heads=2)
                                   ).num_attention_heads == (2, 2)
  assert cfg.layers_per_block == (1, 2) and cfg.cross_attention_dim == (32, 32)
  assert cfg.down_transformer_layers == ((1,), (1, 2))
  assert cfg.up_transformer_layers == ((2, 1, 1), (1, 2))
  assert cfg.mid_transformer_layers == 1  # diffusers: first entry of the last block's list
  assert cfg.only_cross_attention == (False, True)
  sdxl = UNetConfig.from_diffusers(CONFIGS["sdxl"])
  assert sdxl.up_transformer_layers == ((2, 2), (1, 1))  # reversed, one more layer going up
  assert UNetConfig.from_diffusers(CONFIGS["sd1"]).num_attention_heads == (4, 4)


def test_parameter_names_and_shapes_match_diffusers_without_mid_block():
  # The parity cases load with strict=True, which already checks names and shapes there.
  torch.manual_seed(0)
  expected = {k: tuple(v.shape) for k, v in
              diffusers.UNet2DConditionModel(**NO_MID).state_dict().items()}
  abstract = abstract_unet(UNetConfig.from_diffusers(NO_MID))
  assert abstract.mid_block is None
  got = {core.default_torch_key(path):
         core.flax_to_torch_layout(path, np.empty(var.shape, np.bool_)).shape
         for path, var in core.param_paths(abstract)}
  assert got == expected


@pytest.mark.parametrize("key,value", [
    ("class_embed_type", "timestep"), ("num_class_embeds", 10), ("dual_cross_attention", True),
    ("addition_embed_type", "text"), ("time_cond_proj_dim", 8), ("encoder_hid_dim", 16),
    ("time_embedding_type", "fourier"), ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("down_block_types", ("AttnDownBlock2D", "DownBlock2D")),
    ("up_block_types", ("UpBlock2D", "SimpleCrossAttnUpBlock2D")),
    ("resnet_time_scale_shift", "spatial"), ("some_future_option", 1),
])
def test_unsupported_config_raises(key, value):
  with pytest.raises(ValueError, match=key):
    UNetConfig.from_diffusers(dict(CONFIGS["sd1"], **{key: value}))


def test_nested_depths_need_reverse():
  cfg = dict(CONFIGS["sd2"])
  del cfg["reverse_transformer_layers_per_block"]
  with pytest.raises(ValueError, match="reverse_transformer_layers_per_block"):
    UNetConfig.from_diffusers(cfg)


def test_sdxl_requires_added_conditions():
  _, model, x, _, _ = _case("sdxl")
  with pytest.raises(ValueError, match="text_embeds"):
    jax.eval_shape(lambda: model(x["sample"], x["timesteps"], x["context"]))


def test_remat_same_values_and_grads_match_diffusers():
  """remat=True: same forward values; its parameter gradients match torch autograd."""
  tmodel, _, x, _, out = _case("sd1")
  remat = _convert(tmodel, remat=True)
  graphdef, params, rest = nnx.split(remat, nnx.Param, ...)
  n = 2  # a smaller batch keeps the backward passes cheap
  sample, context = x["sample"][:n], x["context"][:n]

  def loss(params):
    y = nnx.merge(graphdef, params, rest)(sample, x["timesteps"], context)
    return jnp.mean(y ** 2), y

  # The blocks really are rematerialised (one remat primitive per resnet / transformer block).
  assert str(jax.make_jaxpr(loss)(params)).count("remat") >= 5
  (_, y), grads = jax.jit(jax.value_and_grad(loss, has_aux=True),
                          compiler_options=FAST_COMPILE)(params)
  # Same values as the non-remat forward (up to float32 rounding: another batch size, other
  # kernels).
  np.testing.assert_allclose(np.asarray(y), out[:n], rtol=0, atol=1e-5)

  tmodel.zero_grad(set_to_none=True)
  with torch.enable_grad():
    ty = tmodel(torch.from_numpy(sample).permute(0, 3, 1, 2), float(x["timesteps"]),
                torch.from_numpy(context)).sample
    (ty ** 2).mean().backward()
  ref = {k: p.grad.numpy().copy() for k, p in tmodel.named_parameters()}
  tmodel.zero_grad(set_to_none=True)
  flat = list(nnx.to_flat_state(grads))
  assert len(flat) == len(ref)
  worst = 0.0
  for path, g in flat:
    key = core.default_torch_key(path)
    got = core.flax_to_torch_layout(path, np.asarray(g[...]))
    scale = max(float(np.abs(ref[key]).max()), 1e-6)
    worst = max(worst, float(np.abs(got - ref[key]).max()) / scale)
  print(f"remat grads: max rel err per tensor {worst:.2e}")
  assert worst < 1e-4


def test_load_from_save_pretrained_folder(tmp_path):
  tmodel, _, x, ref, out = _case("sd1")
  tmodel.save_pretrained(str(tmp_path))
  loaded = load_unet(str(tmp_path))
  np.testing.assert_array_equal(_run(loaded, x), out)
  half = load_unet(str(tmp_path), param_dtype=jnp.bfloat16)
  dtypes = {v.dtype for v in jax.tree.leaves(nnx.state(half, nnx.Param))}
  assert dtypes == {jnp.dtype(jnp.bfloat16)}
  # Placement straight from the file onto a mesh.
  mesh = mesh_lib.make_mesh([("data", 2), ("fsdp", 4)])
  sharded = load_unet(str(tmp_path), shardings=mesh)
  kernel = sharded.down_blocks[0].resnets[0].conv1.kernel
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, "fsdp")
  np.testing.assert_array_equal(np.asarray(kernel[...]),
                                np.asarray(loaded.down_blocks[0].resnets[0].conv1.kernel[...]))


def test_export_roundtrip_into_diffusers():
  tmodel, model, x, ref, _ = _case("sdxl")
  tensors = export_unet(model)
  assert set(tensors) == set(tmodel.state_dict())
  fresh = diffusers.UNet2DConditionModel(**CONFIGS["sdxl"]).eval()
  fresh.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()},
                        strict=True)
  np.testing.assert_array_equal(_torch_forward(fresh, x), ref)


@pytest.mark.parametrize("axes", [[("data", 2), ("fsdp", 4)],
                                  [("data", 2), ("fsdp", 2), ("tensor", 2)]])
def test_sharded_forward_matches_single_device(axes):
  _, model, x, _, out = _case("sdxl")
  mesh = mesh_lib.make_mesh(axes)
  sharded = mesh_lib.shard_module(nnx.clone(model), mesh)
  specs = {str(v.sharding.spec) for _, v in nnx.to_flat_state(nnx.state(sharded, nnx.Param))}
  assert any("fsdp" in s for s in specs)
  if dict(axes).get("tensor"):
    assert any("tensor" in s for s in specs)

  def shard(inputs):
    return {k: (jax.device_put(v, mesh_lib.batch_sharding(mesh, np.ndim(v), batch_size=B))
                if np.ndim(v) else v) for k, v in inputs.items()}

  got = _run(sharded, x, shard)
  abs_err, rel_err = _errors(got, out)
  print(f"sharded {axes}: max abs err {abs_err:.2e}, rel {rel_err:.2e}")
  assert rel_err < 1e-5


def test_bfloat16_compute_close_to_float32():
  tmodel, _, x, _, out = _case("sd1")
  model = _convert(tmodel, dtype=jnp.bfloat16)
  graphdef, state = nnx.split(model)
  got = _apply(graphdef, state, x)
  assert got.dtype == jnp.bfloat16
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  abs_err, rel_err = _errors(np.asarray(got.astype(jnp.float32)), out)
  print(f"bf16: max abs err {abs_err:.2e}, rel {rel_err:.2e}")
  assert np.isfinite(np.asarray(got.astype(jnp.float32))).all()
  assert rel_err < 5e-2

