"""LoRA: adapted layers against a float64 NumPy reference, merge W' = W + (alpha / r) A B, the
PEFT-format export read by diffusers' ``load_lora_weights`` (torch UNet == our LoRA UNet), the
merged diffusers export, and a tiny DDPO update that trains only the adapters."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from didr_jax.convert import core, lora_export, lora_weights
from didr_jax.models import layers, lora, unet as unet_lib
from didr_jax.testing import tiny


def _randomize_adapters(model, seed, scale=0.2):
  """Non-zero A and B (B starts at zero: an export test with B = 0 could not fail)."""
  g = np.random.default_rng(seed)
  for _, layer in lora.adapters(model):
    for var in (layer.lora_a, layer.lora_b):
      var.set_value(jnp.asarray(scale * g.standard_normal(var.shape), jnp.float32))


def test_lora_layers_match_numpy_and_merge():
  g = np.random.default_rng(0)

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.proj = layers.Dense(6, 5, rngs=rngs)
      self.conv = layers.Conv2d(5, 3, 1, 1, 0, rngs=rngs)   # 1x1: adaptable
      self.conv3 = layers.Conv2d(3, 3, 3, 1, 1, rngs=rngs)  # 3x3: not

    def __call__(self, x):
      return self.conv3(self.conv(self.proj(x)))

  model = Net(nnx.Rngs(0))
  with pytest.raises(ValueError, match="not 1x1"):
    lora.target_paths(model, ["conv3"])
  with pytest.raises(ValueError, match="selects no"):
    lora.target_paths(model, ["to_q"])
  w_p, b_p = np.asarray(model.proj.kernel[...], np.float64), np.asarray(model.proj.bias[...])
  w_c, b_c = np.asarray(model.conv.kernel[...], np.float64)[0, 0], np.asarray(model.conv.bias[...])
  assert lora.inject(model, rank=2, alpha=3.0, targets=["proj", "conv"]) == ["proj", "conv"]
  x = g.standard_normal((2, 4, 4, 6)).astype(np.float32)
  y0 = np.asarray(model(jnp.asarray(x)))
  _randomize_adapters(model, 1)
  assert isinstance(model.proj, lora.LoRA) and model.proj.scale == 1.5

  a_p, bb_p = (np.asarray(v[...], np.float64) for v in (model.proj.lora_a, model.proj.lora_b))
  a_c, bb_c = (np.asarray(v[...], np.float64) for v in (model.conv.lora_a, model.conv.lora_b))
  h = x @ w_p + b_p + 1.5 * (x @ a_p) @ bb_p                      # float64 reference
  h = h @ w_c + b_c + 1.5 * (h @ a_c) @ bb_c
  got = np.asarray(model.conv(model.proj(jnp.asarray(x))))
  np.testing.assert_allclose(got, h, rtol=1e-5, atol=1e-5)

  y1 = np.asarray(model(jnp.asarray(x)))
  assert np.abs(y1 - y0).max() > 1e-2                              # the adapters act
  merged = lora.merge(model)
  assert lora.adapters(merged) == [] and len(lora.adapters(model)) == 2  # input untouched
  np.testing.assert_allclose(np.asarray(merged.proj.kernel[...]), w_p + 1.5 * a_p @ bb_p,
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(merged.conv.kernel[...])[0, 0], w_c + 1.5 * a_c @ bb_c,
                             rtol=1e-6, atol=1e-6)
  assert isinstance(merged.proj, nnx.Linear) and not isinstance(merged.proj, lora.LoRA)
  np.testing.assert_allclose(np.asarray(merged(jnp.asarray(x))), y1, rtol=1e-5, atol=1e-5)


def test_adapters_follow_the_sharding_of_their_kernel():
  """Under fsdp A takes its kernel's input-axis sharding and B its output-axis sharding (a
  stacked kernel's leading axes too), so adapters and their AdamW moments shrink with the
  mesh; concrete and abstract (eval_shape) models alike."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from didr_jax.parallel import mesh as mesh_lib
  mesh = mesh_lib.make_mesh((("fsdp", 4), ("tensor", 2)), devices=jax.devices()[:8])

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.proj = layers.Dense(16, 8, rngs=rngs)
      self.conv = layers.Conv2d(8, 8, 1, 1, 0, rngs=rngs)
      self.plain = layers.Dense(8, 8, rngs=rngs)
      self.odd = layers.Dense(16, 6, rngs=rngs)
      self.out = layers.Dense(8, 16, rngs=rngs)

  def place(model):
    for layer, spec in ((model.proj, P("fsdp", "tensor")), (model.odd, P("fsdp", None)),
                        (model.out, P(None, "fsdp")),
                        (model.conv, P(None, None, "fsdp", None))):
      value = layer.kernel.get_value()
      sh = NamedSharding(mesh, spec)
      layer.kernel.set_value(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sh)
                             if isinstance(value, jax.ShapeDtypeStruct)
                             else jax.device_put(value, sh))
    return model

  concrete = place(Net(nnx.Rngs(0)))
  for model in (concrete, place(nnx.eval_shape(lambda: Net(nnx.Rngs(0))))):
    lora.inject(model, rank=2, targets=["proj", "conv", "plain", "odd", "out"])
    specs = {name: (tuple(getattr(model, name).lora_a.get_value().sharding.spec),
                    tuple(getattr(model, name).lora_b.get_value().sharding.spec))
             for name in ("proj", "conv", "odd", "out")}
    # an axis the kernel keeps whole borrows the other's mesh axes when they divide it (6 by 4
    # does not)
    assert specs == {"proj": (("fsdp", None), (None, "tensor")),
                     "conv": (("fsdp", None), (None, "fsdp")),
                     "odd": (("fsdp", None), (None, None)),
                     "out": (("fsdp", None), (None, "fsdp"))}
    sharding = getattr(model.plain.lora_a.get_value(), "sharding", None)
    assert not isinstance(sharding, NamedSharding)  # an unplaced kernel: left as created
  p = concrete.proj  # the sharded adapters compute what the float64 formula says
  p.lora_b.set_value(jax.device_put(jnp.full((2, 8), 0.3), p.lora_b.get_value().sharding))
  x = np.random.default_rng(0).standard_normal((4, 16))
  w, b, a, bb = (np.asarray(v[...], np.float64) for v in (p.base_module.kernel,
                                                            p.base_module.bias, p.lora_a, p.lora_b))
  np.testing.assert_allclose(np.asarray(jax.jit(p)(jnp.asarray(x, jnp.float32))),
                             x @ w + b + (x @ a) @ bb, rtol=1e-5, atol=1e-5)


def test_unet_targets_and_abstract_inject():
  cfg = unet_lib.UNetConfig.from_diffusers(dict(
      in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
      attention_head_dim=4, norm_num_groups=8, use_linear_projection=True))
  model = unet_lib.abstract_unet(cfg)
  paths = lora.target_paths(model)
  # 4 transformers (down 1, mid 1, up 2) x 2 attentions x (q, k, v, out.0)
  assert len(paths) == 32 and all(p[-1] in ("to_q", "to_k", "to_v", 0) for p in paths)
  assert len(lora.target_paths(model, lora.UNET_ATTENTION + lora.UNET_FF + lora.UNET_PROJ)) == 48
  assert len(lora.target_paths(model, [r"attn2\.to_(k|v)"])) == 8
  lora.inject(model, rank=4)   # on a shape-only model: adapters are shapes too
  leaves = jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
  assert len(leaves) == 64 and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  with pytest.raises(ValueError, match="already"):
    lora.inject(model, rank=4)


# ------------------------------------------------------------------------- diffusers parity

@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("sd"))
  tiny.save_tiny_sd(folder, kind="sd", seed=7)
  return folder


def _inputs(seed=0):
  g = np.random.default_rng(seed)
  x = g.standard_normal((2, 4, 16, 16)).astype(np.float32)       # NCHW (diffusers)
  ctx = g.standard_normal((2, 16, 32)).astype(np.float32)
  return x, np.array([17.0, 503.0], np.float32), ctx


def _ours(unet, x, t, ctx):
  out = jax.jit(lambda m, a, b, c: m(a, b, c))(unet, jnp.asarray(x.transpose(0, 2, 3, 1)),
                                               jnp.asarray(t), jnp.asarray(ctx))
  return np.asarray(out).transpose(0, 3, 1, 2)


def _torch(unet, x, t, ctx):
  import torch
  with torch.no_grad():
    return unet(torch.tensor(x), torch.tensor(t), torch.tensor(ctx)).sample.numpy()


TARGETS = lora.UNET_ATTENTION + lora.UNET_FF + lora.UNET_PROJ   # proj_in/out: 1x1 convs in SD 1.x


def test_peft_export_loads_in_diffusers(tiny_sd, tmp_path):
  import torch
  from diffusers import StableDiffusionPipeline
  unet = unet_lib.load_unet(os.path.join(tiny_sd, "unet"))
  lora.inject(unet, rank=4, alpha=2.0, targets=TARGETS)
  _randomize_adapters(unet, 3)
  x, t, ctx = _inputs()
  ours = _ours(unet, x, t, ctx)
  path = lora_weights.save_lora_weights(unet, str(tmp_path / "lora"))
  tensors = core.SafetensorsFile(path)
  assert all(k.startswith("unet.") for k in tensors) and len(tensors) == 2 * 48
  assert tensors.shape("unet.down_blocks.0.attentions.0.proj_in.lora_A.weight") == (4, 32, 1, 1)
  assert tensors.shape(
      "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight") == (4, 32)

  pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, torch_dtype=torch.float32)
  base = _torch(pipe.unet, x, t, ctx)
  pipe.load_lora_weights(str(tmp_path / "lora"))
  got = _torch(pipe.unet, x, t, ctx)
  err = np.abs(got - ours).max()
  effect = np.abs(base - ours).max()
  print(f"torch LoRA UNet vs ours: max abs err {err:.2e} (LoRA effect {effect:.2e})")
  assert effect > 0.05, "the adapters barely change the output: the check would be vacuous"
  assert err < 1e-4 * max(1.0, np.abs(ours).max())

  # Our reader inverts the writer: a fresh model with these weights gives the same output.
  fresh = unet_lib.load_unet(os.path.join(tiny_sd, "unet"))
  lora.inject(fresh, rank=4, alpha=2.0, targets=TARGETS, seed=9)
  lora_weights.load_lora_weights(fresh, tensors)
  np.testing.assert_allclose(_ours(fresh, x, t, ctx), ours, rtol=1e-5, atol=1e-5)


def test_merged_export_loads_in_diffusers(tiny_sd, tmp_path):
  from diffusers import UNet2DConditionModel
  from didr_jax.pipelines import registry
  pipe = registry.load_pipeline(tiny_sd)
  base_kernel = np.asarray(pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0]
                           .attn1.to_q.kernel[...], np.float64)
  lora.inject(pipe.model, rank=3, alpha=6.0)
  _randomize_adapters(pipe.model, 4)
  x, t, ctx = _inputs(1)
  ours = _ours(pipe.model, x, t, ctx)
  lora_weights.export_merged(pipe, str(tmp_path / "merged"))
  assert len(lora.adapters(pipe.model)) == 32          # the pipeline keeps its adapters
  layer = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
  want = base_kernel + 2.0 * (np.asarray(layer.lora_a[...], np.float64)
                              @ np.asarray(layer.lora_b[...], np.float64))
  tensors = core.open_weights(str(tmp_path / "merged" / "unet"))
  np.testing.assert_allclose(
      tensors["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"].T, want,
      rtol=1e-6, atol=1e-6)
  torch_unet = UNet2DConditionModel.from_pretrained(str(tmp_path / "merged" / "unet"))
  got = _torch(torch_unet, x, t, ctx)
  err = np.abs(got - ours).max()
  print(f"merged export in diffusers vs our LoRA UNet: max abs err {err:.2e}")
  assert err < 1e-4 * max(1.0, np.abs(ours).max())


# ------------------------------------------------------------------------------- training

def test_ddpo_update_trains_only_the_adapters(tiny_sd, tmp_path):
  import orbax.checkpoint as ocp
  from didr_jax.parallel import mesh as mesh_lib
  from didr_jax.testing.configs import load_config
  from didr_jax.train import common, config as config_lib, loop
  over = {"backbone.kind": "sd", "backbone.path": tiny_sd, "sample.batch_size": 4,
          "sample.group_size": 4, "sample.num_batches": 1, "sample.num_steps": 2,
          "train.batch_size": 4, "train.timestep_fraction": 0.5,
          "train.learning_rate": 1e-3, "eval.num_samples": 0, "eval.batch_size": 8,
          "num_epochs": 1, "log_images": 4, "async_checkpoint": False, "lora.enabled": True,
          "lora.rank": 2, "lora.alpha": 4.0}
  bad = load_config("toy_ddpo", **{**over, "lora.rank": 0})
  with pytest.raises(config_lib.ConfigError, match="config.lora.rank"):
    config_lib.validate(bad, num_devices=1)
  c = load_config("toy_ddpo", **over)
  mesh = mesh_lib.make_mesh([("data", 1)], devices=jax.devices()[:1])
  backbone = loop.build_backbone(c, mesh)
  with pytest.raises(config_lib.ConfigError, match="config.lora.targets"):
    common.Net.of(backbone.model, lora=load_config("toy_ddpo", **{**over,
                                                                "lora.targets": ("nope",)}).lora)
  base = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(backbone.model, nnx.Param)))
  trainer = loop.make_trainer(c, backbone, mesh)
  n_adapters = len(lora.adapters(backbone.model))
  assert n_adapters == 32        # 4 transformers (down, 2 up, mid) x 2 attentions x (q, k, v, out)
  state = trainer.init_state()
  policy = state["params"]["policy"]
  names = {_key(p[-1]) for p, _ in jax.tree_util.tree_flatten_with_path(policy)[0]}
  assert names == {"lora_a", "lora_b"} and len(jax.tree.leaves(policy)) == 2 * n_adapters
  opt_sizes = sum(x.size for x in jax.tree.leaves(state["opt"]) if x.ndim > 0)
  assert opt_sizes == 2 * sum(x.size for x in jax.tree.leaves(policy))   # Adam's mu and nu
  before = jax.tree.map(np.asarray, policy)

  prompts = ["a red circle"] * 2 + ["two blue squares"] * 2
  traj, _, cond, uncond = trainer.sample(policy, prompts, jax.random.key(0))
  data = {"latents": jnp.swapaxes(traj.latents, 0, 1),
          "log_probs": jnp.swapaxes(traj.log_probs, 0, 1), "cond": cond,
          "timesteps": traj.timesteps, "next_timesteps": traj.next_timesteps,
          "advantages": jnp.linspace(-1.0, 2.0, 4), "rewards": jnp.linspace(0, 1, 4)}
  batch = jax.tree.map(lambda x: x[0], trainer._prepare(jax.random.key(1), data))
  args = (batch, uncond, None, jnp.float32(c.sample.guidance_scale), jax.random.key(2))
  # the frozen base enters the update as an argument: no captured constants (a plain jax.jit
  # of the same function captures the whole base, which XLA would embed unsharded)
  const_size = lambda traced: sum(np.size(x) for x in traced.jaxpr.consts)
  n_base = sum(x.size for x in jax.tree.leaves(base))
  assert const_size(trainer._update.trace(state, *args)) < n_base / 100
  assert const_size(jax.jit(trainer._update_impl).trace(state, *args)) >= n_base
  state, metrics = trainer._update(state, *args)
  assert float(metrics["grad_norm"]) > 0
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                       state["params"]["policy"], before)
  assert min(jax.tree.leaves(moved)) > 0      # every adapter matrix took a step
  # the frozen base the policy is bound to is exactly the loaded one (LoRAParam excluded)
  frozen = nnx.to_pure_dict(nnx.state(trainer.net.bind(state["params"]["policy"]),
                                      nnx.Not(nnx.LoRAParam)))
  flat_frozen = {tuple(_key(e) for e in p if _key(e) != "base_module"): v
                 for p, v in jax.tree_util.tree_flatten_with_path(frozen)[0]}
  flat_base = {tuple(_key(e) for e in p): v
               for p, v in jax.tree_util.tree_flatten_with_path(base)[0]}
  assert flat_frozen.keys() == flat_base.keys()
  for k, want in flat_base.items():
    np.testing.assert_array_equal(np.asarray(flat_frozen[k]), want, err_msg=str(k))

  # the training checkpoint holds the adapters only; export them from the run's folder
  from didr_jax.train import checkpoint
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(c.to_json_best_effort())
  ck = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  ck.save(1, state, {"stream": {}})
  ck.close()
  ckpt = os.path.join(workdir, "checkpoints", "1", "state")
  saved = ocp.StandardCheckpointer().restore(ckpt)
  saved_names = {_key(p[-1]) for p, _ in jax.tree_util.tree_flatten_with_path(saved["params"])[0]}
  assert saved_names == {"lora_a", "lora_b"}
  n_saved = sum(np.size(x) for x in jax.tree.leaves(saved))
  assert n_saved < n_base / 10, (n_saved, n_base)
  msg = lora_export.export_run(workdir, str(tmp_path / "export"))
  assert "step 1" in msg
  # the file holds lora_A = A^T, lora_B = (alpha / r) B^T of the checkpoint's adapters
  tensors = core.SafetensorsFile(os.path.join(tmp_path / "export", lora_weights.WEIGHT_NAME))
  assert len(tensors) == 2 * n_adapters
  layer = saved["params"]["policy"]
  for k in ("up_blocks", 1, "attentions", 1, "transformer_blocks", 0, "attn2", "to_out", 0):
    layer = layer[k] if k in layer else layer[str(k)]     # Orbax restores list keys as str
  key = "unet.up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_out.0"
  np.testing.assert_array_equal(tensors[key + ".lora_A.weight"], np.asarray(layer["lora_a"]).T)
  np.testing.assert_allclose(tensors[key + ".lora_B.weight"], 2.0 * np.asarray(layer["lora_b"]).T,
                             rtol=1e-7)
  assert np.abs(tensors[key + ".lora_B.weight"]).max() > 0     # trained away from B = 0
  # --merge: the run's diffusers pipeline with W' = W + (alpha / r) A B
  lora_export.export_run(workdir, str(tmp_path / "merged"), merge=True)
  merged = core.open_weights(str(tmp_path / "merged" / "unet"))
  w = flat_base[tuple(key.split(".")[1:-1]) + ("0", "kernel")]
  want = np.asarray(w, np.float64) + 2.0 * (np.asarray(layer["lora_a"], np.float64)
                                            @ np.asarray(layer["lora_b"], np.float64))
  np.testing.assert_allclose(merged[key[len("unet."):] + ".weight"].T, want, rtol=1e-6,
                             atol=1e-7)


def _key(entry) -> str:
  return str(getattr(entry, "key", getattr(entry, "idx", entry)))


def test_zimage_scanned_adapters_load_in_diffusers():
  """Stacked adapters of a scanned Z-Image trunk export per layer and act as diffusers' do."""
  import torch
  from diffusers import ZImageTransformer2DModel
  from didr_jax.models import zimage_dit as Z
  torch.manual_seed(0)
  tm = ZImageTransformer2DModel(all_patch_size=[2], all_f_patch_size=[1], in_channels=4, dim=32,
                                n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                                cap_feat_dim=16, axes_dims=[4, 6, 6], axes_lens=[64, 8, 8]).eval()
  with torch.no_grad():
    for p in tm.parameters():
      p.add_(0.1 * torch.randn_like(p))
  sd = {k: v.numpy().copy() for k, v in tm.state_dict().items()}
  model = Z.zimage_from_torch(Z.ZImageConfig.from_diffusers(dict(tm.config)), sd,
                              scan_layers=True)
  lora.inject(model, rank=2, alpha=4.0)
  assert model.layers.attention.to_q.lora_a.shape == (2, 32, 2)       # stacked over 2 layers
  _randomize_adapters(model, 5)
  g = np.random.default_rng(1)
  lat = g.standard_normal((2, 4, 4, 4)).astype(np.float32)
  t = np.array([0.3, 0.8], np.float32)
  cap = g.standard_normal((2, 8, 16)).astype(np.float32)
  fwd = nnx.jit(lambda m, a, b, c: m(a, b, c))
  ours = np.asarray(fwd(model, jnp.asarray(lat), jnp.asarray(t), jnp.asarray(cap)))
  sd_lora = lora_weights.lora_state_dict(model)
  # 2 trunk layers + 1 noise + 1 context refiner, x (q, k, v, out.0), x (A, B)
  assert len(sd_lora) == 32 and "transformer.layers.1.attention.to_out.0.lora_B.weight" in sd_lora

  def run_torch():
    with torch.no_grad():
      outs = tm([torch.from_numpy(lat[i].transpose(2, 0, 1)[:, None]) for i in range(2)],
                torch.from_numpy(t), [torch.from_numpy(cap[i]) for i in range(2)],
                patch_size=2, f_patch_size=1, return_dict=False)[0]
    return np.stack([o[:, 0].numpy().transpose(1, 2, 0) for o in outs])

  base = run_torch()
  tm.load_lora_adapter({k: torch.from_numpy(v) for k, v in sd_lora.items()},
                       prefix="transformer")
  got = run_torch()
  err, effect = np.abs(got - ours).max(), np.abs(base - ours).max()
  print(f"Z-Image torch LoRA vs ours (scanned): max abs err {err:.2e} (LoRA effect {effect:.2e})")
  assert effect > 0.05 and err < 1e-4 * max(1.0, np.abs(ours).max())


def test_lora_run_keeps_the_frozen_base_in_the_compute_dtype(tiny_sd):
  """A bfloat16 LoRA run loads the SD UNet's frozen base in bfloat16 (half the memory of the
  float32 master weights a full fine-tune keeps) and samples exactly the same images: the
  layers computed with bfloat16 weights before. ``master_weights`` (the merged export) keeps
  float32."""
  from didr_jax.testing.configs import load_config
  from didr_jax.train import common, loop
  c = load_config("toy_ddpo", **{"backbone.kind": "sd", "backbone.path": tiny_sd,
                                 "backbone.dtype": "bfloat16", "lora.enabled": True})
  dtypes = lambda m: {str(v.dtype) for v in jax.tree.leaves(nnx.state(m, nnx.Param))}
  lean = loop.build_backbone(c, None)
  full = loop.build_backbone(c, None, master_weights=True)
  assert dtypes(lean.model) == {"bfloat16"} and dtypes(full.model) == {"float32"}
  for pipe in (lean, full):
    common.Net.of(pipe.model, lora=c.lora)   # adapters: B = 0, the base's function
  assert {str(x.dtype) for x in jax.tree.leaves(nnx.state(lean.model, nnx.LoRAParam))} == {
      "float32"}
  images = [np.asarray(p.sample(["a red circle"] * 2, num_steps=2, seed=0)[0])
            for p in (lean, full)]
  np.testing.assert_array_equal(images[0], images[1])
