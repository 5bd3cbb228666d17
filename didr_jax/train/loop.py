"""The training loop every method runs: build, resume, epochs, logging, evaluation, checkpoints.

Rerunning the same command on the same workdir resumes from the latest complete checkpoint
(parameters, optimizer states, EMA snapshots, step, prompt-stream position, the trainer's host
state, metric history); the RNG of epoch e is derived from (seed, e), so a resumed run continues
exactly as the uninterrupted run would have. Rerunning a finished run prints its final metrics.

The loop knows nothing about a method; ``make_trainer`` returns an object with the ``Trainer``
interface below (DDPO: ``train/ddpo.py``).

What the loop guarantees when things go wrong:
- non-finite training: every update skips a step whose loss, gradient norm or new parameters
  are not finite (``common.guarded_apply``); ``train.max_consecutive_nonfinite`` skipped steps
  in a row stop the run (``Stopped``, exit code ``EXIT_NONFINITE``); a non-finite state is
  never saved, so rotation never removes the last good checkpoint;
- SIGTERM / SIGINT (preemption, Ctrl-C): the first signal asks the run to stop at the next safe
  point. While an epoch is still sampling its state is untouched: the epoch is abandoned and
  the last completed epoch is checkpointed (if it is not already); once its updates began, the
  epoch finishes and is checkpointed (an evaluation due then is skipped, and run on resume).
  Exit code ``EXIT_SIGNAL + signum`` (143 for SIGTERM, 130 for SIGINT); a second signal
  exits at once. The rerun resumes exactly;
- a corrupt newest checkpoint (also one whose files no longer match their checksums): it is
  named, moved to ``checkpoints.corrupt/`` and the newest intact step is used
  (``Checkpointer.restore_latest``);
- another run on the same workdir: refused while this one holds the workdir's lock
  (``workdir_lock``); a save the disk refuses raises ``checkpoint.SaveError`` (one line);
- a changed config: ``config.json`` is rewritten only after the checkpoint restored with the
  new config; the earlier one is kept as ``config.<N>.json`` (never overwritten). A config whose
  state does not fit the checkpoints is refused with a ``ConfigError`` naming the keys that
  differ, and nothing in the workdir is changed.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from didr_jax import rewards as rewards_lib
from didr_jax.exact import backbone as exact_backbone
from didr_jax.parallel import mesh as mesh_lib
from didr_jax.pipelines import registry
from didr_jax.toy import detector, toy_clip
from didr_jax.train import advantages, checkpoint, common, config as config_lib, evaluation
from didr_jax.train import prompts
from didr_jax.train import methods, workdir_lock
from didr_jax.train.logging import CompileClock, RunLogger
from didr_jax.train.trainer import Trainer

TOY_ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "toy", "assets")


def unet_param_dtype(c: ml_collections.ConfigDict, *, master_weights: bool = False):
  """The SD UNet's parameter dtype for ``c``: float32 (a full fine-tune's master weights), but
  a LoRA run keeps its frozen base in the compute dtype (``backbone.dtype``: the values the
  layers compute with; adapters stay float32), unless ``master_weights`` (what a merged export
  folds into)."""
  if c.lora.enabled and not master_weights and c.backbone.dtype == "bfloat16":
    return jnp.bfloat16
  return jnp.float32


def build_backbone(c: ml_collections.ConfigDict, mesh, *, master_weights: bool = False):
  """The pipeline named by ``config.backbone`` with parameters placed on ``mesh`` (the SD
  UNet's in ``unet_param_dtype``; the Z-Image DiT's layers stacked with ``scan_layers``)."""
  dtype = jnp.bfloat16 if c.backbone.dtype == "bfloat16" else jnp.float32
  rules = tuple(c.mesh.rules) + mesh_lib.DEFAULT_RULES
  kind = c.backbone.kind
  if kind.startswith("exact_"):  # the exact benchmark's point backbone (no folder)
    return exact_backbone.from_config(c)
  path = c.backbone.path
  if kind in ("toy_unet", "toy_dit") and not path:
    path = os.path.join(TOY_ASSETS, kind)
  if not path:
    raise config_lib.ConfigError(f"config.backbone.path: backbone {kind!r} needs a local model "
                                 "folder (diffusers format or our Orbax cache)")
  if not os.path.isdir(path):
    raise config_lib.ConfigError(f"config.backbone.path: {path!r} is not a folder")
  found = registry.pipeline_kind(path, registry.read_index(path))
  expected = {"toy_unet": "sd", "toy_dit": "zimage"}.get(kind, kind)
  if found != expected:
    raise config_lib.ConfigError(f"config.backbone.kind: {kind!r}, but {path} holds a "
                                 f"{found!r} pipeline")
  extra = ({"scan_layers": c.backbone.scan_layers} if found == "zimage" else
           {"unet_param_dtype": unet_param_dtype(c, master_weights=master_weights)})
  return registry.load_pipeline(path, dtype=dtype, mesh=mesh, rules=rules,
                                remat=c.backbone.remat,
                                resolution=c.backbone.resolution or None, **extra)


EXIT_NONFINITE = 3   # too many consecutive non-finite steps
EXIT_SIGNAL = 128    # + signal number: stopped by SIGTERM (143) / SIGINT (130), checkpoint saved


def run_epoch(trainer: Trainer, state: Any, epoch: int, stream: prompts.PromptStream,
              rewarder: Any, stop: Callable[[], bool] | None = None
              ) -> tuple[Any, dict, np.ndarray]:
  """One epoch of ``trainer``'s phases (``train.trainer``) -> (state, metrics, the last
  batch's first ``log_images`` images). RNG from (seed, epoch). Raises
  ``common.EpochAbandoned`` when ``stop()`` is true at a batch boundary or before the update
  (its ``trained``: the batches that had already changed the state, for the methods that update
  per batch; the loop then resumes from the last checkpoint instead of saving this state) and
  ``common.NonFiniteError`` (from the trainer's ``common.NonFiniteGuard``)."""
  c = trainer.c
  s = c.sample
  k_batches, k_update = trainer.epoch_keys(jax.random.fold_in(jax.random.key(c.seed), epoch))
  t0 = time.time()
  batches, futures, drawn, shown = [], [], [], None
  for b in range(s.num_batches):
    if stop is not None and stop():  # at a batch boundary: within one batch of the signal
      raise common.EpochAbandoned(epoch, trained=b if trainer.updates_each_batch else 0)
    batch_prompts = stream.next(s.batch_size // s.group_size, s.group_size)
    state, images, data = trainer.rollout(state, batch_prompts, jax.random.fold_in(k_batches, b))
    shown = common.host_rows(images)  # this host's rows, scored and (the last batch's) logged
    future = rewarder.submit(shown, batch_prompts)
    state, data = trainer.after_rollout(state, data, future)
    batches.append(data)
    futures.append(future)
    drawn += list(batch_prompts)
  rewards = advantages.gather_host(np.concatenate([np.asarray(f.result()) for f in futures]))
  t_rollout = time.time() - t0
  if stop is not None and not trainer.updates_each_batch and stop():
    raise common.EpochAbandoned(epoch)
  t1 = time.time()
  state, metrics = trainer.update(state, batches, drawn, rewards, k_update)
  metrics.update({"reward_mean": float(np.mean(rewards)), "reward_std": float(np.std(rewards)),
                  "time_rollout_s": t_rollout, "time_update_s": time.time() - t1,
                  "samples_per_s": len(rewards) / (time.time() - t0)})
  return state, metrics, np.asarray(shown)[: c.log_images]


class Stopped(Exception):
  """The run stopped early on purpose (signal, non-finite training): ``message`` is one line
  for the user and ``exit_code`` the process exit code (``didr_jax.main``)."""

  def __init__(self, message: str, exit_code: int):
    super().__init__(message)
    self.exit_code = exit_code


class StopRequest:
  """Catches SIGTERM and SIGINT while the loop runs (main thread only). ``stop()`` is true once
  a signal came, on any process (the flag is or-reduced across processes, so every host stops at
  the same point); the first signal restores the previous handler, so a second one acts at once."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum = None
    self._old = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in self.SIGNALS:
        self._old[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)
    self._old = {}

  def _handle(self, signum, frame):
    self.signum = signum
    signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
    print(f"\nreceived {signal.Signals(signum).name}: stopping at the next safe point and saving "
          "a checkpoint (send it again to stop at once, without saving)", flush=True)

  def __call__(self) -> bool:
    local = self.signum is not None
    if jax.process_count() == 1:
      return local
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.int32(local))))

  def exit_code(self) -> int:
    return EXIT_SIGNAL + int(self.signum or signal.SIGTERM)


def make_trainer(c, backbone, mesh) -> Trainer:
  """The trainer of ``c.method`` (``train.methods``) on ``backbone`` over ``mesh``."""
  return methods.get(c.method).trainer_class()(c, backbone, mesh)


def eval_metrics(c) -> tuple[dict, dict]:
  """Per-image metrics: every configured reward plus the toy detector for toy prompts;
  set metrics: the detector's shape accuracy for toy prompts and the toy fidelity when the toy
  CLIP is available."""
  per_image = {n: rewards_lib.make(n) for n in c.rewards}
  set_metrics = {}
  if c.prompts.eval.startswith("toy:"):
    per_image.setdefault("toy_detector", rewards_lib.make("toy_detector"))
    set_metrics["toy_shape_accuracy"] = detector.shape_accuracy
    if toy_clip.available():
      set_metrics["toy_fidelity_fd"] = toy_clip.load().fidelity
  return per_image, set_metrics


def eval_prompts(c) -> list[str]:
  """The held-out prompt of each evaluation sample, in order (``evaluation.evaluate``'s)."""
  ps = prompts.load_prompts(c.prompts.eval)
  return [ps[i % len(ps)] for i in range(c.eval.num_samples)]


def run_eval(c, trainer, state, progress=None) -> tuple[dict, np.ndarray]:
  """The evaluation of ``trainer``'s evaluated parameters (``evaluation.evaluate``)."""
  ev = c.eval
  params = trainer.policy_params(state)
  # a multi-step policy samples at the evaluation's steps and noise level; a generator with
  # its own fixed steps takes no such settings
  kw = ({"num_steps": ev.num_steps if ev.num_steps > 0 else c.sample.num_steps, "eta": ev.eta}
        if methods.get(c.method).policy else {})

  def sample_fn(ps, rng):
    _, images, _, _ = trainer.sample(params, ps, rng, **kw)
    return images

  per_image, set_metrics = eval_metrics(c)
  return evaluation.evaluate(sample_fn, prompts.load_prompts(c.prompts.eval), per_image,
                             num_samples=ev.num_samples, batch_size=ev.batch_size,
                             set_metrics=set_metrics, progress=progress)


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_diff(old: dict, new: dict) -> list[str]:
  """``key: old -> new`` for every dotted key whose value differs (or exists on one side)."""
  a, b = _flat(old), _flat(new)
  missing = object()
  out = []
  for k in sorted(set(a) | set(b)):
    va, vb = a.get(k, missing), b.get(k, missing)
    if va != vb:
      fmt = lambda v: "(absent)" if v is missing else repr(v)
      out.append(f"{k}: {fmt(va)} -> {fmt(vb)}")
  return out


def describe_diff(diff: list[str], limit: int = 6) -> str:
  """``config_diff`` lines for one message: ``method`` and ``backbone.*`` first, at most
  ``limit`` lines, the rest counted per top-level section (a change of method touches dozens of
  keys, and the one that matters must not be buried)."""
  rank = lambda line: (0 if line.startswith("method:") else
                       1 if line.startswith("backbone.") else 2)
  lines = sorted(diff, key=rank)
  shown, rest = lines[:limit], lines[limit:]
  text = "; ".join(shown)
  if rest:
    sections: dict[str, int] = {}
    for line in rest:
      top = line.split(":", 1)[0].split(".", 1)[0]
      sections[top] = sections.get(top, 0) + 1
    text += (f"; and {len(rest)} more in " +
             ", ".join(f"{k} ({n})" for k, n in sorted(sections.items())))
  return text


def _config_text(c) -> str:
  return c.to_json_best_effort(indent=2, sort_keys=True)


def _save_config(workdir: str, text: str, diff: list[str]):
  """Writes ``config.json``; a differing earlier one is kept as ``config.<N>.json`` (the
  smallest unused N, so no earlier version is ever overwritten)."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      if f.read() == text:
        return
    n = 1
    while os.path.exists(os.path.join(workdir, f"config.{n}.json")):
      n += 1
    kept = os.path.join(workdir, f"config.{n}.json")
    os.replace(path, kept)
    print(f"note: this run's config differs from the saved one ({describe_diff(diff)}); the "
          f"earlier config is kept as {kept}", flush=True)
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def _final_metrics(history: list, step: int) -> dict:
  out = {}
  for h in history:
    if h.get("step") == step:
      out.update({k: v for k, v in h.items() if k != "step"})
  return out


def _workdir_listing(workdir: str) -> str:
  rows = []
  for name in sorted(set(os.listdir(workdir)) - {workdir_lock.LOCK_NAME}):
    p = os.path.join(workdir, name)
    if os.path.isdir(p):
      rows.append(f"  {name}/ ({len(os.listdir(p))} entries)")
    else:
      rows.append(f"  {name} ({os.path.getsize(p)} bytes)")
  return "\n".join(rows)


def _eval_due(c, step: int) -> bool:
  return c.eval.num_samples > 0 and (step == 0 or step == c.num_epochs or
                                     (c.eval_every > 0 and step % c.eval_every == 0))


def train(c: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) ``c`` in ``workdir``; returns the last epoch's metrics. Raises
  ``ConfigError`` for bad or incompatible settings, ``WorkdirError`` for a workdir that another
  run holds (its lock, held for the run: ``workdir_lock``) or that is not a writable folder,
  ``Stopped`` for an early stop and ``checkpoint.SaveError`` when the disk refuses a save."""
  info = config_lib.validate(c)
  lock = workdir_lock.lock_for_run(workdir)
  try:
    return _train(c, workdir, info)
  finally:
    if lock is not None:
      lock.release()


def _train(c: ml_collections.ConfigDict, workdir: str, info: dict) -> dict:
  os.makedirs(workdir, exist_ok=True)
  text = _config_text(c)
  saved_path = os.path.join(workdir, "config.json")
  diff = []
  if os.path.exists(saved_path):
    with open(saved_path) as f:
      diff = config_diff(json.load(f), json.loads(text))
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 max_to_keep=c.keep_checkpoints, async_save=c.async_checkpoint)
  latest = ckpt.latest_step()
  if latest is not None and latest >= c.num_epochs:  # finished: say so without loading a model
    try:
      host = ckpt.restore_host(latest)
    except Exception:  # a corrupt newest step: the full path below falls back
      host = None
    if host is not None:
      ckpt.close()
      final = _final_metrics(host.get("history", []), latest)
      print(f"nothing left to do: {workdir} holds the finished run (epoch {latest} of "
            f"{c.num_epochs}; raise --config.num_epochs to train on)", flush=True)
      if diff:
        print(f"note: this config differs from {saved_path} ({describe_diff(diff)})", flush=True)
      head = {k: v for k, v in final.items() if k.startswith("eval/") or k == "reward_mean"}
      print("final metrics:", json.dumps(head), f"({len(final)} in all: "
            f"{os.path.join(workdir, 'history.json')})", flush=True)
      print(f"{workdir}:\n{_workdir_listing(workdir)}", flush=True)
      return final

  CompileClock.install()
  mesh = mesh_lib.make_mesh(tuple(tuple(a) for a in c.mesh.axes))
  print("batch:", ", ".join(f"{k}={v}" for k, v in info.items()), "| mesh:", dict(mesh.shape),
        flush=True)
  backbone = build_backbone(c, mesh)
  trainer = make_trainer(c, backbone, mesh)
  stream = prompts.PromptStream(prompts.load_prompts(c.prompts.train), seed=c.seed)
  backbone.warn_long_prompts(stream.prompts, "training prompts")
  state = trainer.init_state()
  start, history = 0, []
  if latest is not None:
    try:
      state, host, start = ckpt.restore_latest(checkpoint.abstract_like(state))
    except checkpoint.RestoreError as e:
      ckpt.close()
      if diff:
        raise config_lib.ConfigError(
            f"config: {workdir} was trained with a different config ({describe_diff(diff)}) and "
            f"its checkpoints do not fit this one; use a new --workdir or the saved "
            f"{saved_path}") from None
      raise config_lib.ConfigError(f"checkpoints: none restores ({e})") from None
    stream.load_state_dict(host["stream"])
    trainer.load_host_state(host)
    history = host.get("history", [])
    print(f"resumed from {ckpt.directory} at epoch {start}", flush=True)
  _save_config(workdir, text, diff)  # only now: the config is known to fit the checkpoint
  rewarder = rewards_lib.AsyncRewards(rewards_lib.from_config(dict(c.rewards)))
  logger = RunLogger(workdir, c.num_epochs, history)
  try:
    with StopRequest() as stop:
      return _epochs(c, workdir, trainer, state, start, stream, rewarder, ckpt, logger, stop)
  finally:
    try:
      ckpt.close()  # may raise checkpoint.SaveError (a failed last save)
    finally:
      rewarder.close()
      logger.close()


def _epochs(c, workdir, trainer, state, start, stream, rewarder, ckpt, logger, stop) -> dict:
  def host(base=None):
    base = base or {"stream": stream.state_dict(), **trainer.host_state()}
    return {**base, "history": list(logger.history)}

  def evaluate(step):
    if step == start:
      print(f"evaluating {'the base model' if step == 0 else f'epoch {step}'} on "
            f"{c.eval.num_samples} held-out samples (compiling the sampler first: first "
            "evaluation only) ...", flush=True)
    t0 = time.time()

    def progress(done, total):
      if total > c.eval.batch_size and logger.is_main:
        print(f"  evaluated {done}/{total} samples ({time.time() - t0:.0f} s)", flush=True)

    m, images = run_eval(c, trainer, state, progress)
    logger.evaluated(time.time() - t0, CompileClock.seconds(t0, time.time()))
    logger.scalars(step, {f"eval/{k}": v for k, v in m.items()})
    logger.images(step, {"eval_samples": images[: c.log_images]})
    logger.eval_grid(step, images[: c.log_images], eval_prompts(c))
    print(f"eval ({'base' if step == 0 else f'epoch {step}'}):", json.dumps(m), flush=True)
    return m

  def stopped(step, saved: bool, abandoned: str = ""):
    ckpt.wait()
    logger.flush()
    where = (f"checkpoint of epoch {step} saved" if saved else
             f"epoch {step} was already checkpointed" if step else "nothing trained yet")
    where = f"{abandoned}; {where}" if abandoned else where
    raise Stopped(f"stopped by {signal.Signals(stop.exit_code() - EXIT_SIGNAL).name} after "
                  f"epoch {step}/{c.num_epochs} ({where}); rerun the same command to resume",
                  stop.exit_code())

  recorded = {h["step"] for h in logger.history if any(k.startswith("eval/") for k in h)}
  if _eval_due(c, start) and start not in recorded and not stop():
    evaluate(start)   # the base model, or an evaluation a signal skipped before the checkpoint
    logger.flush()
  metrics = {}
  for epoch in range(start, c.num_epochs):
    snapshot = json.loads(json.dumps(host()))  # the host state at the start of this epoch
    if epoch == start:
      print(f"epoch {epoch + 1}/{c.num_epochs}: compiling sampling and the update step (the first "
            f"epoch {'of the run' if epoch == 0 else 'after a resume'} only) ...", flush=True)
    t0 = time.time()
    try:
      state, metrics, images = run_epoch(trainer, state, epoch, stream, rewarder, stop)
    except common.EpochAbandoned as e:
      saved = False
      ckpt.wait()
      if e.trained:  # the state is part-way through the epoch: keep the last checkpoint
        stopped(ckpt.latest_step() or 0, False,
                f"epoch {epoch + 1} abandoned after {e.trained} of {c.sample.num_batches} batches")
      if epoch > 0 and ckpt.latest_step() != epoch:
        ckpt.save(epoch, state, snapshot, force=True)
        saved = True
      stopped(epoch, saved)
    except common.NonFiniteError as e:
      raise Stopped(f"{e} (last checkpoint: epoch {ckpt.latest_step()})", EXIT_NONFINITE) from None
    step = epoch + 1
    t1 = time.time()
    logger.scalars(step, metrics)
    logger.images(step, {"train_samples": images})
    logger.progress(step, t1 - t0, {k: metrics[k] for k in trainer.progress_keys if k in metrics},
                    compile_seconds=CompileClock.seconds(t0, t1),
                    evals_left=sum(_eval_due(c, e) for e in range(step, c.num_epochs + 1)))
    halt = stop()
    if _eval_due(c, step) and (not halt or step == c.num_epochs):
      m = evaluate(step)
      metrics.update({f"eval/{k}": v for k, v in m.items()})
    if step % c.checkpoint_every == 0 or step == c.num_epochs or halt:
      try:
        ckpt.save(step, state, host(), force=step == c.num_epochs or halt)
      except checkpoint.NonFiniteState as e:
        raise Stopped(str(e), EXIT_NONFINITE) from None
    logger.flush()
    if halt and step < c.num_epochs:
      stopped(step, True)
  return metrics
