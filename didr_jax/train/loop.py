"""The training loop every method runs: build, resume, epochs, logging, evaluation, checkpoints.

Rerunning the same command on the same workdir resumes from the latest complete checkpoint
(parameters, optimizer states, EMA snapshots, step, prompt-stream position, advantage buffers,
metric history); the RNG of epoch e is derived from (seed, e), so a resumed run continues
exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from didr_jax import rewards as rewards_lib
from didr_jax.parallel import mesh as mesh_lib
from didr_jax.train import advantages, checkpoint, config as config_lib, evaluation, prompts
from didr_jax.train.logging import RunLogger

TOY_ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "toy", "assets")


def build_backbone(c: ml_collections.ConfigDict, mesh):
  """The pipeline named by ``config.backbone`` with parameters placed on ``mesh``."""
  dtype = jnp.bfloat16 if c.backbone.dtype == "bfloat16" else jnp.float32
  rules = tuple(c.mesh.rules) + mesh_lib.DEFAULT_RULES
  kind = c.backbone.kind
  path = c.backbone.path
  if kind in ("toy_unet", "toy_dit") and not path:
    path = os.path.join(TOY_ASSETS, kind)
  if not path:
    raise config_lib.ConfigError(f"config.backbone.path: backbone {kind!r} needs a local model "
                                 "folder (diffusers format or our Orbax cache)")
  if not os.path.isdir(path):
    raise config_lib.ConfigError(f"config.backbone.path: {path!r} is not a folder")
  from didr_jax.pipelines import registry
  pipe = registry.load_pipeline(path, dtype=dtype, mesh=mesh, rules=rules,
                                remat=c.backbone.remat,
                                resolution=c.backbone.resolution or None)
  found = pipe.kind
  expected = {"toy_unet": "sd", "toy_dit": "zimage"}.get(kind, kind)
  if found != expected:
    raise config_lib.ConfigError(f"config.backbone.kind: {kind!r}, but {path} holds a "
                                 f"{found!r} pipeline")
  return pipe


def make_trainer(c, backbone, mesh):
  if c.method == "ddpo":
    from didr_jax.train.ddpo import DDPOTrainer
    return DDPOTrainer(c, backbone, mesh)
  raise config_lib.ConfigError(f"config.method: unknown method {c.method!r}")


def eval_metrics(c) -> tuple[dict, dict]:
  """Per-image metrics: every configured reward plus the toy detector for toy prompts;
  set metrics: the detector's shape accuracy for toy prompts and the toy fidelity when the toy
  CLIP is available."""
  from didr_jax.toy import detector, toy_clip
  per_image = {n: rewards_lib.make(n) for n in c.rewards}
  set_metrics = {}
  if c.prompts.eval.startswith("toy:"):
    per_image.setdefault("toy_detector", rewards_lib.make("toy_detector"))
    set_metrics["toy_shape_accuracy"] = detector.shape_accuracy
    if toy_clip.available():
      set_metrics["toy_fidelity_fd"] = toy_clip.load().fidelity
  return per_image, set_metrics


def run_eval(c, trainer, state) -> tuple[dict, np.ndarray]:
  ev = c.eval
  num_steps = ev.num_steps if ev.num_steps > 0 else c.sample.num_steps
  params = trainer.policy_params(state)

  def sample_fn(ps, rng):
    _, images, _, _ = trainer.sample(params, ps, rng, num_steps=num_steps, eta=ev.eta)
    return images

  per_image, set_metrics = eval_metrics(c)
  return evaluation.evaluate(sample_fn, prompts.load_prompts(c.prompts.eval), per_image,
                             num_samples=ev.num_samples, batch_size=ev.batch_size,
                             set_metrics=set_metrics)


def _save_config(c, workdir: str):
  path = os.path.join(workdir, "config.json")
  text = c.to_json_best_effort(indent=2, sort_keys=True)
  if os.path.exists(path):
    with open(path) as f:
      if f.read() != text:
        print(f"note: {path} differs from this run's config; resuming with the new config "
              "(the old one is kept as config.prev.json)")
        os.replace(path, os.path.join(workdir, "config.prev.json"))
  if jax.process_index() == 0:
    with open(path, "w") as f:
      f.write(text)


def train(c: ml_collections.ConfigDict, workdir: str) -> dict:
  info = config_lib.validate(c)
  os.makedirs(workdir, exist_ok=True)
  _save_config(c, workdir)
  mesh = mesh_lib.make_mesh(tuple(tuple(a) for a in c.mesh.axes))
  print("batch:", ", ".join(f"{k}={v}" for k, v in info.items()), "| mesh:", dict(mesh.shape),
        flush=True)
  backbone = build_backbone(c, mesh)
  trainer = make_trainer(c, backbone, mesh)
  rewarder = rewards_lib.AsyncRewards(rewards_lib.from_config(dict(c.rewards)))
  stream = prompts.PromptStream(prompts.load_prompts(c.prompts.train), seed=c.seed)
  backbone.warn_long_prompts(stream.prompts, "training prompts")
  d = getattr(c, c.method)
  normalizer = advantages.AdvantageNormalizer(d.advantage, d.buffer_size, d.min_count)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 max_to_keep=c.keep_checkpoints, async_save=c.async_checkpoint)
  state = trainer.init_state()
  start, history = 0, []
  if ckpt.latest_step() is not None:
    state, host, start = ckpt.restore(checkpoint.abstract_like(state))
    stream.load_state_dict(host["stream"])
    normalizer.load_state_dict(host["advantages"])
    history = host.get("history", [])
    print(f"resumed from {ckpt.directory} at epoch {start}", flush=True)
  logger = RunLogger(workdir, c.num_epochs, history)
  if start == 0 and c.eval.num_samples > 0:
    m, images = run_eval(c, trainer, state)
    logger.scalars(0, {f"eval/{k}": v for k, v in m.items()})
    logger.images(0, {"eval_samples": images[: c.log_images]})
    print("eval (base):", json.dumps(m), flush=True)
  metrics = {}
  for epoch in range(start, c.num_epochs):
    t0 = time.time()
    state, metrics, images = trainer.epoch(state, epoch, stream, normalizer, rewarder)
    step = epoch + 1
    logger.scalars(step, metrics)
    logger.images(step, {"train_samples": images})
    logger.progress(step, time.time() - t0, {k: metrics[k] for k in
                                             ("reward_mean", "loss", "approx_kl") if k in metrics})
    last = step == c.num_epochs
    if c.eval.num_samples > 0 and ((c.eval_every > 0 and step % c.eval_every == 0) or last):
      m, images = run_eval(c, trainer, state)
      logger.scalars(step, {f"eval/{k}": v for k, v in m.items()})
      logger.images(step, {"eval_samples": images[: c.log_images]})
      print(f"eval (epoch {step}):", json.dumps(m), flush=True)
      metrics.update({f"eval/{k}": v for k, v in m.items()})
    if step % c.checkpoint_every == 0 or last:
      host = {"stream": stream.state_dict(), "advantages": normalizer.state_dict(),
              "history": logger.history}
      ckpt.save(step, state, host, force=last)
    logger.flush()
  ckpt.close()
  rewarder.close()
  logger.close()
  return metrics
