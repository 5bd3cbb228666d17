"""Every bad input gets one line on stderr, a non-zero exit and no traceback, before the model
loads where the input can be checked without it (issue 11).

``test_cli_refuses`` runs each command-line case of ``CASES`` as a subprocess; the config
checks that all end in the same one-line path (``config.validate`` -> ``ConfigError``) are
tested in-process (``test_validate_refuses``), one of them also through the CLI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_NUM_CPU_DEVICES": "1", "JAX_PLATFORMS": "cpu",
       "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=ENV, capture_output=True,
                        text=True, timeout=timeout)


def _largest_file(folder):
  files = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs]
  return max(files, key=os.path.getsize)


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  """A tiny toy pipeline folder, a copy with a truncated safetensors file, an Orbax cache of it
  with a truncated data file, an empty folder, and bad prompt / latents files."""
  from didr_jax.pipelines import registry
  from didr_jax.testing import tiny
  d = tmp_path_factory.mktemp("cli_errors")
  model = tiny.save_tiny_toy(str(d / "model"))
  trunc = str(d / "trunc")
  shutil.copytree(model, trunc)
  _truncate(os.path.join(trunc, "unet", "diffusion_pytorch_model.safetensors"))
  cache = str(d / "cache")
  registry.load_pipeline(model).save(cache)
  _truncate(_largest_file(os.path.join(cache, "orbax_params")))
  (d / "empty").mkdir()
  (d / "empty.txt").write_text("\n  \n")
  (d / "long.txt").write_text("a red circle " * 40 + "\nsmall blue square\n")
  (d / "text.npy").write_text("not an array\n")
  good = np.zeros((1, 3, 16, 16), np.float32)
  np.savez(d / "l.npz", latents=good)
  np.save(d / "nhwc.npy", good.transpose(0, 2, 3, 1))
  for name, value in (("nan", np.nan), ("inf", np.inf)):
    bad = good.copy()
    bad[0, 1, 2, 3] = value
    np.save(d / f"{name}.npy", bad)
  run_dir = d / "run"
  run_dir.mkdir()
  (run_dir / "config.json").write_text('{"method": "ddpo", ')  # cut off mid-write
  escape = str(d / "escape")  # its UNet's shard index points at the model folder's weights
  shutil.copytree(model, escape)
  os.remove(os.path.join(escape, "unet", "diffusion_pytorch_model.safetensors"))
  with open(os.path.join(escape, "unet", "diffusion_pytorch_model.safetensors.index.json"),
            "w") as f:
    json.dump({"weight_map": {"conv_in.weight": "../../model/unet/"
                                                 "diffusion_pytorch_model.safetensors"}}, f)
  xl_claim = str(d / "xl_claim")  # SD components under an SDXL class name
  shutil.copytree(model, xl_claim)
  index_path = os.path.join(xl_claim, "model_index.json")
  index = json.load(open(index_path))
  with open(index_path, "w") as f:
    json.dump(dict(index, _class_name="StableDiffusionXLPipeline"), f)
  return {"dir": str(d), "model": model, "trunc": trunc, "cache": cache,
          "empty": str(d / "empty"), "run": str(run_dir), "escape": escape,
          "xl_claim": xl_claim}


MAIN = ("didr_jax.main", "--config=configs/toy_ddpo.py", "--workdir={dir}/w",
        "--config.eval.num_samples=0")
SAMPLE = ("didr_jax.sample", "--model={model}", "--prompt=a red circle", "--steps=1",
          "--out={dir}/s")

# (id, argv, substrings the one line must contain)
CASES = [
    ("misspelt_config_key", ("didr_jax.main", "--config=configs/toy_ddpo.py",
                             "--config.train.learnin_rate=1", "--workdir={dir}/w"),
     ["--config.train.learnin_rate", 'did you mean "learning_rate"']),
    ("missing_config_file", ("didr_jax.main", "--config=configs/nope.py", "--workdir={dir}/w"),
     ["--config=configs/nope.py", "No such file"]),
    ("main_empty_model_folder", MAIN + ("--config.backbone.kind=sd",
                                        "--config.backbone.path={empty}"),
     ["config.backbone.path", "is empty", "model_index.json"]),
    ("main_truncated_safetensors", MAIN + ("--config.backbone.kind=sd",
                                           "--config.backbone.path={trunc}"),
     ["config.backbone.path", "is truncated", "diffusion_pytorch_model.safetensors"]),
    ("main_empty_prompt_file", MAIN + ("--config.prompts.train={dir}/empty.txt",),
     ["config.prompts.train", "has no prompts"]),
    ("main_unknown_reward_flag", MAIN + ("--config.rewards.nope=1.0",),
     ["config.rewards.nope", "unknown reward", "jpeg_compressibility"]),
    # a reward the config file does not list is accepted: validation goes on to the next key
    ("main_new_reward_from_flag", MAIN + ("--config.rewards.jpeg_compressibility=1.0",
                                          "--config.checkpoint_every=0"),
     ["config.checkpoint_every", "must be >= 1"]),
    ("sample_empty_model_folder", ("didr_jax.sample", "--model={empty}", "--prompt=a"),
     ["is empty", "model_index.json"]),
    ("sample_truncated_safetensors", ("didr_jax.sample", "--model={trunc}", "--prompt=a"),
     ["is truncated", "fetch the file again"]),
    ("sample_truncated_orbax_cache", ("didr_jax.sample", "--model={cache}", "--prompt=a"),
     ["could not restore the Orbax checkpoint", "convert the source folder again"]),
    ("convert_empty_model_folder", ("didr_jax.convert", "--src={empty}", "--dst={dir}/o"),
     ["is empty"]),
    ("convert_dst_is_a_file", ("didr_jax.convert", "--src={model}", "--dst={dir}/empty.txt"),
     ["--dst", "empty.txt' is a file"]),
    ("convert_dst_under_a_file", ("didr_jax.convert", "--src={model}", "--export",
                                  "--dst={dir}/empty.txt/out"),
     ["--dst", "lies under", "empty.txt', which is a file"]),
    ("convert_index_names_shards_outside", ("didr_jax.convert", "--src={escape}",
                                            "--dst={dir}/o"),
     ["names shards outside its folder", "../../model/unet/"]),
    ("convert_sdxl_class_over_sd_components", ("didr_jax.convert", "--src={xl_claim}",
                                               "--dst={dir}/o"),
     ["StableDiffusionXLPipeline", "lists no text_encoder_2"]),
    ("latents_wrong_shape", SAMPLE + ("--latents={dir}/nhwc.npy",),
     ["(1, 16, 16, 3)", "expects NCHW (1, 3, 16, 16)"]),
    ("latents_text_file", SAMPLE + ("--latents={dir}/text.npy",), ["is not a .npy file"]),
    ("latents_npz", SAMPLE + ("--latents={dir}/l.npz",), ["is an .npz archive", "np.save"]),
    ("latents_nan", SAMPLE + ("--latents={dir}/nan.npy",), ["1 NaN or infinite values"]),
    ("latents_inf", SAMPLE + ("--latents={dir}/inf.npy",), ["1 NaN or infinite values"]),
    ("evaluate_corrupt_config_json", ("didr_jax.evaluate", "--workdir={run}"),
     ["config.json is unreadable"]),
]


@pytest.mark.parametrize("name,argv,expected", CASES, ids=[c[0] for c in CASES])
def test_cli_refuses(inputs, name, argv, expected):
  r = run(*(a.format(**inputs) for a in argv))
  lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
  assert r.returncode != 0, (r.stdout, r.stderr)
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  assert len(lines) == 1, r.stderr[-3000:]
  assert lines[0].startswith("error: ")
  for s in expected:
    assert s in lines[0], (s, lines[0])
  assert not os.path.exists(os.path.join(inputs["dir"], "s")), "an image was written"
  assert not os.path.exists(os.path.join(inputs["dir"], "o")), "a conversion was written"


@pytest.mark.parametrize("module,flag", [
    ("didr_jax.main", "--help"), ("didr_jax.main", "--helpfull"), ("didr_jax.sample", "--help"),
    ("didr_jax.evaluate", "--help"), ("didr_jax.convert", "-?"),
    ("didr_jax.convert.lora_export", "--help")])  # (rewards.server: argparse's help, exit 0)
def test_help_exits_0(module, flag):
  r = run(module, flag, timeout=120)
  assert r.returncode == 0, (r.stdout[-500:], r.stderr[-2000:])
  assert "flags:" in r.stdout and "Traceback" not in r.stderr, r.stdout[-500:]


def test_compile_cache_under_a_file_is_refused_before_anything_loads(inputs, tmp_path):
  """``config.compile_cache_dir`` (and JAX_COMPILATION_CACHE_DIR, which wins over it) under a
  file: one line, exit 2, no workdir made."""
  blocker = os.path.join(inputs["dir"], "empty.txt")
  env = {k: v for k, v in ENV.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  for extra_env, flag, expected in [
      ({}, f"--config.compile_cache_dir={blocker}/xla", "config.compile_cache_dir: "),
      ({"JAX_COMPILATION_CACHE_DIR": blocker}, "--config.compile_cache_dir=",
       "JAX_COMPILATION_CACHE_DIR: ")]:
    r = subprocess.run([sys.executable, "-m", "didr_jax.main", "--config=configs/toy_ddpo.py",
                        f"--workdir={tmp_path}/w", flag], cwd=ROOT, env={**env, **extra_env},
                       capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith("error: " + expected) and "empty.txt" in lines[0], lines
    assert not os.path.exists(tmp_path / "w")


def test_sample_warns_once_about_long_prompts(inputs):
  r = run("didr_jax.sample", f"--model={inputs['model']}", f"--prompt_file={inputs['dir']}/long.txt",
          "--steps=1", f"--out={inputs['dir']}/long_out")
  assert r.returncode == 0, r.stderr[-3000:]
  warnings = [ln for ln in r.stderr.splitlines() if "longer than" in ln]
  assert len(warnings) == 1 and "1 of 2 prompts" in warnings[0], r.stderr
  assert "truncated to 12" in warnings[0]


# ------------------------------------------------------------------------- config validation

def _toy(**kw):
  from didr_jax.testing.configs import load_config
  return load_config("toy_ddpo", **kw)


BAD_SETTINGS = [
    ({"seed": -1}, "config.seed"),
    ({"rewards": {"nope": 1.0}}, "config.rewards.nope"),
    ({"checkpoint_every": 0}, "config.checkpoint_every"),
    ({"checkpoint_every": -2}, "config.checkpoint_every"),
    ({"keep_checkpoints": 0}, "config.keep_checkpoints"),
    ({"eval_every": -1}, "config.eval_every"),
    ({"train.learning_rate": float("nan")}, "config.train.learning_rate"),
    ({"train.learning_rate": float("inf")}, "config.train.learning_rate"),
    ({"train.learning_rate": -1e-4}, "config.train.learning_rate"),
    ({"train.learning_rate": 0.0}, "config.train.learning_rate"),
    ({"train.adam_b2": 1.0}, "config.train.adam_b2"),
    ({"train.adam_eps": 0.0}, "config.train.adam_eps"),
    ({"train.weight_decay": -0.1}, "config.train.weight_decay"),
    ({"train.max_grad_norm": -1.0}, "config.train.max_grad_norm"),
    ({"sample.eta": -0.5}, "config.sample.eta"),
    ({"sample.guidance_scale": float("nan")}, "config.sample.guidance_scale"),
    ({"eval.eta": -1.0}, "config.eval.eta"),
    ({"eval.num_steps": 0}, "config.eval.num_steps"),
    ({"eval.batch_size": 0}, "config.eval.batch_size"),
    ({"ddpo.clip_range": -1e-4}, "config.ddpo.clip_range"),
    ({"ddpo.clip_range": float("nan")}, "config.ddpo.clip_range"),
    ({"ddpo.adv_clip_max": 0.0}, "config.ddpo.adv_clip_max"),
    ({"ddpo.kl_beta": -0.1}, "config.ddpo.kl_beta"),
    ({"ddpo.advantage": "groups"}, "config.ddpo.advantage"),
    ({"ddpo.objective": "ppo2"}, "config.ddpo.objective"),
    ({"ddpo.rwr_percentile": 1.0}, "config.ddpo.rwr_percentile"),
    ({"rewards": {"toy_detector": float("nan")}}, "config.rewards.toy_detector"),
    ({"rewards": {"toy_detector": float("inf")}}, "config.rewards.toy_detector"),
    ({"rewards": {"toy_detector": 0.0}}, "config.rewards"),
    ({"rewards": {"toy_detecter": 1.0}}, "config.rewards.toy_detecter"),
    ({"prompts.train": "/nonexistent/prompts.txt"}, "config.prompts.train"),
    ({"prompts.eval": "toy:test"}, "config.prompts.eval"),
    ({"backbone.kind": "sdxl", "backbone.path": os.path.join(ROOT, "didr_jax", "toy", "assets",
                                                             "toy_unet")},
     "config.backbone.kind"),  # the toy folder holds SD
]


@pytest.mark.parametrize("settings,key", BAD_SETTINGS, ids=[k for _, k in BAD_SETTINGS])
def test_validate_refuses(settings, key):
  from didr_jax.train import config as config_lib
  c = _toy()
  for k, v in settings.items():
    *parents, leaf = k.split(".")
    holder = c
    for p in parents:
      holder = holder[p]
    if isinstance(v, dict):
      with holder.unlocked():
        holder[leaf] = v
    else:
      holder[leaf] = v
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c, num_devices=1)
  assert str(e.value).startswith(key + ":"), str(e.value)
  assert "\n" not in str(e.value)


def test_validate_accepts_the_shipped_configs_and_any_registered_reward(monkeypatch):
  from didr_jax import rewards
  from didr_jax.train import config as config_lib
  monkeypatch.setenv("DIDR_REWARD_URL", "http://127.0.0.1:8765/")  # the remote reward's server
  c = _toy()
  with c.rewards.unlocked():
    for name in rewards.names():
      c.rewards[name] = 0.5
  config_lib.validate(c, num_devices=1)
  import runpy
  for f in sorted(os.listdir(os.path.join(ROOT, "configs"))):
    if f.endswith(".py"):
      cfg = runpy.run_path(os.path.join(ROOT, "configs", f))["get_config"]()
      if cfg.backbone.path or cfg.backbone.kind.startswith("toy"):
        config_lib.validate(cfg, num_devices=1)
      else:
        config_lib._check_numbers(cfg)  # noqa: SLF001 (real backbones need a model folder)
        config_lib._check_rewards(cfg)  # noqa: SLF001


def test_zero_weight_rewards_are_left_out():
  from didr_jax import rewards
  r = rewards.from_config({"toy_detector": 0.0, "jpeg_compressibility": 1.0})
  assert r.name == "jpeg_compressibility"


def test_shard_index_may_only_name_files_beside_it(inputs, tmp_path):
  from didr_jax.convert import core
  unet = tmp_path / "unet"
  shutil.copytree(os.path.join(inputs["model"], "unet"), unet)
  index = unet / "diffusion_pytorch_model.safetensors.index.json"
  source = os.path.join(inputs["model"], "unet", "diffusion_pytorch_model.safetensors")
  for shard in (source, "../unet/diffusion_pytorch_model.safetensors", "sub/x.safetensors",
                ".."):
    index.write_text(json.dumps({"weight_map": {"conv_in.weight": shard}}))
    with pytest.raises(core.ConversionError, match="names shards outside its folder"):
      core.open_weights(str(unet))
  index.write_text(json.dumps({"weight_map": ["x.safetensors"]}))
  with pytest.raises(core.ConversionError, match="no \"weight_map\""):
    core.open_weights(str(unet))
  ref = core.open_weights(os.path.dirname(source))  # a plain file name beside it is read
  os.replace(unet / "diffusion_pytorch_model.safetensors", unet / "shard.safetensors")
  index.write_text(json.dumps({"weight_map": {k: "shard.safetensors" for k in ref}}))
  store = core.open_weights(str(unet))
  assert sorted(store) == sorted(ref)
  np.testing.assert_array_equal(store["conv_in.weight"], ref["conv_in.weight"])


def test_sd_class_and_components_must_agree(inputs, tmp_path):
  """The class name, the text encoders it lists and the UNet's config agree: an SD class
  listing a second text encoder, or an SDXL pipeline whose UNet is SD's, is refused."""
  from didr_jax.errors import ConversionError
  from didr_jax.pipelines import registry
  index = json.load(open(os.path.join(inputs["model"], "model_index.json")))
  assert registry.pipeline_kind("m", index) == "sd"
  te2 = dict(index, text_encoder_2=["transformers", "CLIPTextModelWithProjection"])
  with pytest.raises(ConversionError, match="StableDiffusionPipeline but lists a text_encoder_2"):
    registry.pipeline_kind("m", te2)
  xl = str(tmp_path / "xl")  # SDXL's listing and folders, SD's UNet
  shutil.copytree(inputs["model"], xl)
  for a, b in (("text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2")):
    shutil.copytree(os.path.join(xl, a), os.path.join(xl, b))
  with open(os.path.join(xl, "model_index.json"), "w") as f:
    json.dump(dict(te2, _class_name="StableDiffusionXLPipeline",
                   tokenizer_2=["transformers", "CLIPTokenizer"]), f)
  with pytest.raises(ConversionError, match="describes an SDXL pipeline but unet/config.json is "
                     "not an SDXL UNet"):
    registry.check_folder(xl)


def test_orbax_cache_without_metadata_is_refused_before_loading(inputs, tmp_path):
  from didr_jax.errors import ConversionError
  from didr_jax.pipelines import registry
  cache = str(tmp_path / "cache")
  shutil.copytree(inputs["cache"], cache)
  os.remove(os.path.join(cache, "orbax_params", "_METADATA"))
  with pytest.raises(ConversionError, match="incomplete .*_METADATA is missing"):
    registry.check_folder(cache)
  assert json.load(open(os.path.join(inputs["model"], "model_index.json")))  # source intact


# ------------------------------------------------------------------------- launch scripts

def test_tpu_pod_passes_every_argument_unchanged_to_the_workers(tmp_path):
  """The remote command (DRY_RUN=1 prints it) run by bash with stand-ins for cd / pip / python
  gives python exactly the arguments the user typed: spaces, quotes, $ and ; included."""
  marker = tmp_path / "injected"
  args = ["configs/my config.py", "/runs/it's $HOME", '--config.prompts.train=/data/"p" q.txt',
          f"--config.backbone.path=$(touch {marker}); touch {marker}"]
  r = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), "tpu", "zone", *args],
                     env={**os.environ, "DRY_RUN": "1"}, capture_output=True, text=True,
                     timeout=60)
  assert r.returncode == 0, r.stderr
  remote = r.stdout.strip()
  stubs = 'cd() { :; }; pip() { :; }; python() { printf "%s\\0" "$@"; }; '
  got = subprocess.run(["bash", "-c", stubs + remote], capture_output=True, timeout=60)
  assert got.returncode == 0, got.stderr
  received = got.stdout.decode().split("\0")[:-1]
  assert received == ["-m", "didr_jax.main", f"--config={args[0]}", f"--workdir={args[1]}",
                      *args[2:]]
  assert not marker.exists()


@pytest.mark.parametrize("script", ["tpu_pod.sh", "gpu_host.sh", "local_multiprocess_cpu.sh",
                                    "slurm.sbatch"])
def test_launch_scripts_print_usage_without_arguments(script):
  r = subprocess.run(["bash", os.path.join(ROOT, "launch", script)], capture_output=True,
                     text=True, timeout=60)
  assert r.returncode == 2 and r.stderr.startswith("usage:"), r.stderr


# ------------------------------------------------------------------------- long prompts

def test_count_truncated_counts_the_prompts_over_the_text_encoders_limit():
  """The shipped toy tokenizers are word-level: a prompt of w words is w + 2 tokens for CLIP
  (begin / end) and w + k tokens in Z-Image's chat template (k measured on a 3-word prompt)."""
  import types
  from transformers import AutoTokenizer
  from didr_jax.models import qwen3
  from didr_jax.pipelines.sd import SDPipeline
  from didr_jax.pipelines.zimage import ZImagePipeline
  assets = os.path.join(ROOT, "didr_jax", "toy", "assets")
  words = lambda n: " ".join(["a red circle"] * n)  # 3n words  # noqa: E731
  clip_tok = AutoTokenizer.from_pretrained(os.path.join(assets, "toy_unet", "tokenizer"))
  assert clip_tok.model_max_length == 12
  sd = types.SimpleNamespace(tokenizers=[clip_tok])
  # 3, 9, 12 words -> 5, 11, 14 tokens: one over 12
  assert SDPipeline.count_truncated(sd, [words(1), words(3), words(4)]) == (1, 12, 14)
  assert SDPipeline.count_truncated(sd, [words(4), words(5)], max_tokens=16) == (1, 16, 17)
  qwen_tok = AutoTokenizer.from_pretrained(os.path.join(assets, "toy_dit", "tokenizer"))
  k = int(qwen3.tokenize_prompts_zimage(qwen_tok, [words(1)], bucket=1)[1].sum()) - 3
  zi = types.SimpleNamespace(tokenizer=qwen_tok, caption_length=k + 9)
  assert ZImagePipeline.count_truncated(zi, [words(1), words(3), words(4), words(9)]) == (
      2, k + 9, k + 27)


def test_reward_flags_set_any_registered_reward(tmp_path):
  """``--config.rewards.NAME=W`` adds a reward the config file does not list (and 0 switches
  one off); the parsed config holds exactly those weights."""
  script = (
      "import json\n"
      "from ml_collections import config_flags\n"
      "from didr_jax import cli_util\n"
      "C = config_flags.DEFINE_config_file('config', None, 'c', lock_config=True)\n"
      "def main(argv):\n"
      "  print(json.dumps(dict(C.value.rewards)))\n"
      "cli_util.run(main)\n")
  f = tmp_path / "show.py"
  f.write_text(script)
  r = subprocess.run([sys.executable, str(f), "--config=configs/toy_ddpo.py",
                      "--config.rewards.jpeg_compressibility=1.5",
                      "--config.rewards.toy_detector=0", "--config.train.learning_rate=1e-3"],
                     cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert json.loads(r.stdout.strip().splitlines()[-1]) == {"toy_detector": 0.0,
                                                           "jpeg_compressibility": 1.5}
  r = subprocess.run([sys.executable, str(f), "--config=configs/toy_ddpo.py",
                      "--config.rewards.jpeg_compressibility=lots"],
                     cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2 and "the weight must be a number" in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1
