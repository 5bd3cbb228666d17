"""AutoencoderKL parity against diffusers (float32, tiny random configs), loading, export, sharding."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from diffusers import AutoencoderKL as TorchVAE

from didr_jax.convert.core import ConversionError, open_weights, save_safetensors
from didr_jax.models import vae as vae_lib
from didr_jax.parallel.mesh import batch_sharding, make_mesh, shard_module

CONFIGS = {
    # SD-like: 4 latent channels, quant convs, three levels (two downsamples).
    "sd": dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
               up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[8, 16, 16],
               layers_per_block=1, latent_channels=4, norm_num_groups=4, act_fn="silu",
               scaling_factor=0.18215, shift_factor=None, use_quant_conv=True,
               use_post_quant_conv=True, mid_block_add_attention=True, sample_size=16),
    # Flux / Z-Image style: 16 latent channels, no quant convs, shift factor.
    "flux": dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                 up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[16, 32],
                 layers_per_block=2, latent_channels=16, norm_num_groups=8, act_fn="silu",
                 scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                 use_post_quant_conv=False, mid_block_add_attention=True, sample_size=16),
    # No mid-block attention, and a resnet activation other than the output SiLU.
    "noattn": dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                   up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 8],
                   layers_per_block=1, latent_channels=4, norm_num_groups=4, act_fn="mish",
                   mid_block_add_attention=False, sample_size=8),
}
IMG = 16

# Jitted entry points (one compile per model structure; eager dispatch is far slower on CPU).
_encode = nnx.jit(lambda m, x: m.encode(x))
_decode = nnx.jit(lambda m, z: m.decode(z))
_from_latents = nnx.jit(lambda m, z: vae_lib.decode_latents(m, z))


@nnx.jit
def _helpers(m, x, z, key):
  return (vae_lib.encode_to_latents(m, x), vae_lib.encode_to_latents(m, x, key),
          vae_lib.decode_latents(m, z))


def _perturb(module: torch.nn.Module, seed: int) -> None:
  """Adds noise to every parameter so zero-init biases and unit norm scales are exercised."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=g))


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  abs_err = float(np.max(np.abs(a - b)))
  return abs_err, abs_err / float(np.max(np.abs(b)))


def _assert_close(got, want, rel=1e-5, what=""):
  abs_err, rel_err = _err(got, want)
  print(f"{what}: max abs err {abs_err:.2e}, rel {rel_err:.2e}")
  assert rel_err < rel, f"{what}: max abs err {abs_err:.3e} (rel {rel_err:.3e})"


class Case:
  """A torch VAE, its save_pretrained folder, the JAX model loaded from it, and test inputs."""

  def __init__(self, name, tmp):
    torch.manual_seed(0)
    self.cfg = CONFIGS[name]
    self.torch = TorchVAE(**self.cfg).eval()
    _perturb(self.torch, 1)
    self.folder = str(tmp / name)
    self.torch.save_pretrained(self.folder, safe_serialization=True)
    self.jax = vae_lib.load_vae(self.folder)
    rng = np.random.default_rng(0)
    size = IMG if name != "noattn" else 8
    self.x = rng.uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
    f = self.jax.config.downsample_factor
    self.z = rng.normal(size=(2, size // f, size // f, self.cfg["latent_channels"]))
    self.z = self.z.astype(np.float32)
    with torch.no_grad():
      post = self.torch.encode(_nchw(self.x)).latent_dist
      self.t_mean, self.t_logvar = _nhwc(post.mean), _nhwc(post.logvar)
      self.t_dec = _nhwc(self.torch.decode(_nchw(self.z)).sample)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("vae")
  return {name: Case(name, tmp) for name in CONFIGS}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_encode_decode_parity(cases, name):
  """Loaded from save_pretrained's folder, encode (mean, logvar) and decode match diffusers."""
  c = cases[name]
  mean, logvar = _encode(c.jax, jnp.asarray(c.x))
  assert mean.shape == c.t_mean.shape[:3] + (c.cfg["latent_channels"],)
  _assert_close(mean, c.t_mean, what=f"{name} mean")
  _assert_close(logvar, c.t_logvar, what=f"{name} logvar")
  dec = _decode(c.jax, jnp.asarray(c.z))
  assert dec.shape == (2,) + c.x.shape[1:]
  _assert_close(dec, c.t_dec, what=f"{name} decode")


def test_parity_with_small_activations(tmp_path):
  """With the inner conv weights and the attention output projection scaled by 1e-3,
  activations are ~1e-3 and each GroupNorm's variance is comparable to its eps (1e-6): a wrong
  eps anywhere would show here. q / k / v stay unscaled so the attention still contributes;
  conv_out and the quant convs stay unscaled so the outputs are not dominated by biases."""
  torch.manual_seed(0)
  cfg = CONFIGS["sd"]
  model = TorchVAE(**cfg).eval()
  _perturb(model, 2)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if ("norm" not in name and "quant_conv" not in name and "conv_out" not in name
          and not any(f".to_{n}." in name for n in "qkv")):
        p.mul_(1e-3)
  model.save_pretrained(str(tmp_path), safe_serialization=True)
  jmodel = vae_lib.load_vae(str(tmp_path))
  rng = np.random.default_rng(1)
  x = rng.uniform(-1, 1, (1, IMG, IMG, 3)).astype(np.float32)
  z = (1e-3 * rng.normal(size=(1, 4, 4, 4))).astype(np.float32)
  with torch.no_grad():
    post = model.encode(_nchw(x)).latent_dist
    dec = model.decode(_nchw(z)).sample
  mean, logvar = _encode(jmodel, jnp.asarray(x))
  _assert_close(mean, _nhwc(post.mean), what="small-activation mean")
  _assert_close(logvar, _nhwc(post.logvar), what="small-activation logvar")
  _assert_close(_decode(jmodel, jnp.asarray(z)), _nhwc(dec), what="small-activation decode")


def test_config_fields(cases):
  c = vae_lib.VAEConfig.from_diffusers(CONFIGS["flux"])
  assert c.shift_factor == pytest.approx(0.1159) and not c.use_quant_conv
  assert c.block_out_channels == (16, 32) and c.latent_channels == 16
  assert c.downsample_factor == 2
  assert vae_lib.VAEConfig.from_diffusers(CONFIGS["sd"]).shift_factor is None
  assert cases["flux"].jax.quant_conv is None and cases["flux"].jax.post_quant_conv is None
  bad = dict(CONFIGS["sd"], up_block_types=["UpDecoderBlock2D", "AttnUpDecoderBlock2D",
                                            "UpDecoderBlock2D"])
  with pytest.raises(ValueError, match=r"up_block_types\[1\].*AttnUpDecoderBlock2D"):
    vae_lib.VAEConfig.from_diffusers(bad)


@pytest.mark.parametrize("name", ["sd", "flux"])
def test_latent_helpers_follow_pipeline_convention(cases, name):
  """encode_to_latents = (mode - shift) * scaling; decode_latents inverts the normalisation;
  with an rng the sample is mean + exp(logvar / 2) * eps."""
  c = cases[name]
  scale, shift = c.cfg["scaling_factor"], c.cfg["shift_factor"] or 0.0
  key = jax.random.key(3)
  lat, sampled, dec = _helpers(c.jax, jnp.asarray(c.x), jnp.asarray(c.z), key)
  _assert_close(lat, (c.t_mean - shift) * scale, what=f"{name} latents")
  with torch.no_grad():
    want = _nhwc(c.torch.decode(_nchw(c.z) / scale + shift).sample)
  _assert_close(dec, want, what=f"{name} decode_latents")
  eps = np.asarray(jax.random.normal(key, c.t_mean.shape, jnp.float32))
  want = (c.t_mean + np.exp(0.5 * c.t_logvar) * eps - shift) * scale
  _assert_close(sampled, want, what=f"{name} sampled latents")
  assert not np.allclose(sampled, lat)


@pytest.mark.parametrize("name", ["sd", "flux"])
def test_export_roundtrip_into_torch(cases, name):
  """export_vae -> load_state_dict(strict=True) into a fresh torch VAE -> same outputs."""
  c = cases[name]
  tensors = vae_lib.export_vae(c.jax)
  fresh = TorchVAE(**c.cfg).eval()
  assert set(tensors) == set(fresh.state_dict())
  fresh.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()},
                        strict=True)
  with torch.no_grad():
    post = fresh.encode(_nchw(c.x)).latent_dist
    np.testing.assert_array_equal(_nhwc(post.mean), c.t_mean)
    np.testing.assert_array_equal(_nhwc(fresh.decode(_nchw(c.z)).sample), c.t_dec)


def test_save_vae_folder_loads_in_diffusers(cases, tmp_path):
  """save_vae writes a component folder that AutoencoderKL.from_pretrained reads back."""
  c = cases["flux"]
  vae_lib.save_vae(c.jax, str(tmp_path))
  reloaded = TorchVAE.from_pretrained(str(tmp_path)).eval()
  assert reloaded.config.shift_factor == pytest.approx(0.1159)
  assert reloaded.quant_conv is None
  with torch.no_grad():
    np.testing.assert_array_equal(_nhwc(reloaded.decode(_nchw(c.z)).sample), c.t_dec)


def test_legacy_attention_names_load(cases, tmp_path):
  """Old checkpoints naming the mid-block attention query/key/value/proj_attn still load."""
  c = cases["sd"]
  rename = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.",
            ".to_out.0.": ".proj_attn."}
  legacy = {}
  for k, v in vae_lib.export_vae(c.jax).items():
    for old, new in rename.items():
      k = k.replace(old, new)
    legacy[k] = v
  assert any(".proj_attn." in k for k in legacy)
  folder = tmp_path / "legacy"
  folder.mkdir()
  (folder / "config.json").write_text(open(os.path.join(c.folder, "config.json")).read())
  save_safetensors(legacy, str(folder / "diffusion_pytorch_model.safetensors"))
  model = vae_lib.load_vae(str(folder))
  np.testing.assert_array_equal(_decode(model, jnp.asarray(c.z)), _decode(c.jax, jnp.asarray(c.z)))


def test_incomplete_folder_fails_clearly(cases, tmp_path):
  c = cases["sd"]
  tensors = {k: np.array(v) for k, v in open_weights(c.folder).items()}
  dropped = "decoder.up_blocks.1.resnets.0.conv2.weight"
  del tensors[dropped]
  folder = tmp_path / "broken"
  folder.mkdir()
  (folder / "config.json").write_text(open(os.path.join(c.folder, "config.json")).read())
  save_safetensors(tensors, str(folder / "diffusion_pytorch_model.safetensors"))
  with pytest.raises(ConversionError, match="missing") as e:
    vae_lib.load_vae(str(folder))
  assert dropped in str(e.value)
  with pytest.raises(ConversionError, match="config.json"):
    vae_lib.load_vae(str(tmp_path))


def test_sharded_decode_matches_single_device(cases):
  """A jitted decode with params sharded over data/fsdp/tensor and the batch over data*fsdp
  equals the single-device result."""
  c = cases["sd"]
  mesh = make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  z = jnp.asarray(np.concatenate([c.z, c.z[::-1] * 0.5]))  # batch 4 = data * fsdp
  decode = _from_latents
  want = decode(c.jax, z)
  zs = jax.device_put(z, batch_sharding(mesh, 4))
  placed = shard_module(nnx.clone(c.jax), mesh)
  loaded = vae_lib.load_vae(c.folder, shardings=mesh)  # placed by logical axes while loading
  for model, what in ((placed, "shard_module"), (loaded, "load_vae(shardings=mesh)")):
    kernel = model.decoder.up_blocks[0].resnets[0].conv1.kernel[...]
    assert not kernel.sharding.is_fully_replicated, what
    got = decode(model, zs)
    assert len(got.sharding.device_set) == 8
    _assert_close(got, want, rel=1e-5, what=f"sharded decode ({what})")


def test_bfloat16_load(cases):
  """param_dtype sets the parameter dtype, dtype the activations; bf16 stays close to f32."""
  c = cases["flux"]
  model = vae_lib.load_vae(c.folder, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  dec = _decode(model, jnp.asarray(c.z, jnp.bfloat16))
  assert dec.dtype == jnp.bfloat16
  _assert_close(dec.astype(jnp.float32), c.t_dec, rel=5e-2, what="bf16 decode")


def test_remat_gradients_match(cases):
  """remat=True only changes memory: decode gradients are the same."""
  c = cases["noattn"]
  remat = vae_lib.load_vae(c.folder, remat=True)
  assert remat.decoder.remat and not c.jax.decoder.remat
  grad = nnx.jit(nnx.grad(lambda m, z: jnp.mean(jnp.square(m.decode(z)))))
  g0 = grad(c.jax, jnp.asarray(c.z))
  g1 = grad(remat, jnp.asarray(c.z))
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):  # float32 rounding: ~1.6e-7
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=5e-7)
