"""A training run's evaluated model out of its workdir: read-only restore, diffusers export.

``load_run`` restores one checkpoint of a workdir written by ``didr_jax.main`` (the latest, or
``epoch``) without changing anything there (no lock, no file moved or written) and asks the
method's trainer which parameters the run samples and evaluates with
(``trainer.policy_params``: DDPO's / CRD's policy, DIDR's / TDM's generator EMA).
``export_pipeline`` writes them as a complete diffusers pipeline folder: the trained denoiser
(LoRA adapters merged into the base, W' = W + s A B) beside the base folder's other components,
loadable by diffusers' ``from_pretrained``.

A one-step (DIDR) or few-step (TDM, TDM-R1) generator is sampled differently from its base, so
its folder's ``scheduler/`` is the generator's sampler and ``didr_jax_sampling.json`` says how
to call it (``sampling_recipe``):

- one-step VP (SD / SDXL, conditioning time t_g, default 399): ``LCMScheduler`` with the base's
  betas, ``timesteps=[t_g]``: LCM's last step returns c_out x0 + c_skip x with c_skip ~ 2e-8 at
  t = 399, i.e. the generator's x0 = (z - sigma_g eps) / alpha_g on unscaled noise z;
- one-step flow (Z-Image, sigma_g, default 1): ``FlowMatchEulerDiscreteScheduler`` unshifted,
  ``sigmas=[sigma_g]``: one Euler step z - sigma_g v;
- K-step VP student: ``DDIMScheduler`` (the base's options), K steps, eta 0: the student's grid
  is DDIM's K-step grid;
- K-step flow student: the Euler scheduler with ``shift = tdm.shift`` (static) and ``sigmas`` =
  linspace(1, 1/K, K), which the scheduler shifts into the student's grid.
No CFG unless ``tdm.student_cfg`` > 1 (diffusers' SD pipelines take the CFG scale w, Z-Image's
takes w - 1). DDPO / CRD keep the base's scheduler; the file records the run's evaluation
sampler (steps, eta, CFG).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from typing import Any

import numpy as np

from didr_jax.errors import ConfigError

# jax-heavy modules (convert.core, the trainers) are imported where needed: the output checks
# here run before anything loads

SAMPLING_FILE = "didr_jax_sampling.json"


def _stderr(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


def _fail(message: str):
  raise ConfigError(message)


def read_run_config(workdir: str):
  """The run's ``config.json`` completed with today's defaults (``config.with_defaults``)."""
  from didr_jax.train import config as config_lib  # lazy: jax-heavy; the checks run before it
  if not os.path.isdir(workdir):
    _fail(f"--workdir={workdir}: " + ("is a file; expected a run directory written by "
                                      "didr_jax.main" if os.path.exists(workdir) else
                                      "no such directory"))
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    _fail(f"{path} not found: is {workdir!r} a run directory written by didr_jax.main?")
  try:
    with open(path) as f:
      return config_lib.with_defaults(json.load(f))
  except (OSError, ValueError, AttributeError, TypeError) as e:
    _fail(f"{path} is unreadable ({e}); restore it from an earlier config.N.json")


def checkpoint_steps(workdir: str) -> list[int]:
  """The complete checkpoint steps of a run (Orbax's finalized step folders), oldest first."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory)
                if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


@dataclasses.dataclass
class Run:
  """A restored run: its config, its trainer (holding the loaded backbone), the restored
  training state of checkpoint ``step`` and the parameters it evaluates with
  (``trainer.policy_params(state)``)."""
  config: Any                       # ml_collections.ConfigDict
  workdir: str
  trainer: Any
  state: Any
  params: Any
  step: int

  def model(self):
    """The denoiser with the evaluated parameters (a LoRA run's adapters still separate)."""
    return self.trainer.net.bind(self.params)

  def pipeline(self):
    """The backbone pipeline with the evaluated denoiser in place, adapters merged: the
    folder ``export_pipeline`` writes."""
    from didr_jax.convert import lora_weights  # lazy: jax-heavy; the checks run before it
    return lora_weights.merged_pipeline(self.trainer.bb, self.model())


def load_run(workdir: str, *, epoch: int | None = None, master_weights: bool = False,
             warn=_stderr) -> Run:
  """Restores ``workdir``'s checkpoint ``epoch`` (default: the newest that restores and
  matches its checksums; newer ones that fail are named with ``warn`` and left where they
  are). Read-only: nothing in the workdir is created, moved or written, no lock is taken.
  ``master_weights``: a LoRA run's base in float32 (what a merged export folds into) instead
  of the run's compute dtype. Bad input raises ``ConfigError`` with one line."""
  from didr_jax.parallel import mesh as mesh_lib  # lazy: jax-heavy; the checks run before it
  from didr_jax.train import checkpoint, config as config_lib, loop  # lazy: after the checks
  workdir = os.path.abspath(workdir)
  c = read_run_config(workdir)
  steps = checkpoint_steps(workdir)
  if not steps:
    _fail(f"no checkpoint in {workdir}/checkpoints: the run has not finished an epoch yet")
  if epoch is not None and epoch not in steps:
    _fail(f"--epoch={epoch}: {workdir} has checkpoints of epochs {steps} only")
  config_lib.validate(c, num_devices=1, training=False)  # batches need not fit these devices
  try:
    mesh = mesh_lib.make_mesh(tuple(tuple(a) for a in c.mesh.axes))
  except ValueError:  # the run's mesh needs other device counts: any layout restores
    mesh = mesh_lib.make_mesh()
  trainer = loop.make_trainer(c, loop.build_backbone(c, mesh, master_weights=master_weights),
                              mesh)
  abstract = checkpoint.abstract_like(trainer.init_state())
  # read_only: creates, moves and writes nothing; a corrupt newer step is named and skipped
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  try:
    state, _, step = (ckpt.restore_latest(abstract, warn=warn) if epoch is None else
                      ckpt.restore(abstract, epoch))
  except checkpoint.RestoreError as e:
    _fail(f"{workdir}: " + ("no checkpoint restores" if epoch is None else
                            f"the checkpoint of epoch {epoch} does not restore") + f" ({e})")
  finally:
    ckpt.close()
  return Run(c, workdir, trainer, state, trainer.policy_params(state), step)


# ---------------------------------------------------------------------------------------------
# sampling recipes


def _vp_scheduler(base: dict, class_name: str) -> dict:
  """A VP scheduler config with the base's DDIM options (absent keys at DDIMScheduler's
  defaults, as ``VPSchedule.from_diffusers`` reads them)."""
  from didr_jax.diffusion.schedules import _DDIM_DEFAULTS  # lazy: jax loads after the flag checks
  return {"_class_name": class_name,
          **{k: v if base.get(k) is None else base[k] for k, v in _DDIM_DEFAULTS.items()}}


def _flow_scheduler(base: dict, shift: float) -> dict:
  """The base's flow-matching Euler scheduler with a static ``shift`` (no dynamic shifting or
  terminal stretch: the grid is exactly shift(sigmas))."""
  drop = ("use_dynamic_shifting", "shift", "shift_terminal", "use_karras_sigmas",
          "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas", "stochastic_sampling")
  return {**{k: v for k, v in base.items() if k not in drop and not k.startswith("_")},
          "_class_name": "FlowMatchEulerDiscreteScheduler", "shift": float(shift),
          "use_dynamic_shifting": False}


def sampling_recipe(run: Run, base_scheduler: dict) -> tuple[dict, dict | None]:
  """(what ``didr_jax_sampling.json`` holds, the scheduler config the folder needs: None to
  keep the base's). The JSON names the method, the epoch, the sampler and the diffusers call
  arguments (``pipeline_kwargs``) that reproduce the run's samples."""
  c = run.config
  bb = run.trainer.bb
  vp = bb.family == "vp"
  no_cfg = 1.0 if vp else 0.0        # diffusers' guidance_scale that turns CFG off
  info = {"method": c.method, "epoch": run.step, "workdir": run.workdir,
          "family": "vp" if vp else "flow", "prediction_type": bb.prediction_type}
  from didr_jax.train import methods  # lazy: imports jax; the output checks run before it
  fixed = None if methods.get(c.method).policy else run.trainer.fixed_sampler()
  if fixed is not None and fixed["kind"] == "one_step":
    info.update(sampler="one-step generator", num_steps=1, conditioning_time=fixed["time"],
                guidance_scale=1.0)
    if vp:
      t = int(fixed["time"])
      info["pipeline_kwargs"] = {"num_inference_steps": 1, "timesteps": [t],
                                 "guidance_scale": no_cfg}
      info["note"] = (f"x0 = (z - sigma eps) / alpha at t = {t} on unscaled noise z; LCM's "
                      "boundary terms differ from it by c_skip ~ 1e-8")
      return info, _vp_scheduler(base_scheduler, "LCMScheduler")
    info["pipeline_kwargs"] = {"num_inference_steps": 1, "sigmas": [float(fixed["time"])],
                               "guidance_scale": no_cfg}
    return info, _flow_scheduler(base_scheduler, 1.0)
  if fixed is not None:  # "few_step": a deterministic student on its own time grid
    times = [float(x) for x in fixed["times"]]
    k = len(times) - 1
    w = float(fixed["guidance"])
    info.update(sampler=f"{k}-step deterministic student", num_steps=k, guidance_scale=w,
                grid=times)
    if vp:
      info["grid_note"] = "timesteps; the last entry < 0 is the clean end (final alpha)"
      info["pipeline_kwargs"] = {"num_inference_steps": k, "eta": 0.0, "guidance_scale": w}
      return info, _vp_scheduler(base_scheduler, "DDIMScheduler")
    u = [float(x) for x in np.linspace(1.0, 1.0 / k, k)]
    info["pipeline_kwargs"] = {"num_inference_steps": k, "sigmas": u,
                               "guidance_scale": w - 1.0}
    return info, _flow_scheduler(base_scheduler, float(fixed["shift"]))
  ev, s = c.eval, c.sample
  steps = int(ev.num_steps) if int(ev.num_steps) > 0 else int(s.num_steps)
  w = float(s.guidance_scale)
  info.update(sampler="policy (the base's sampler at the run's evaluation settings)",
              num_steps=steps, eta=float(ev.eta), guidance_scale=w)
  kwargs = {"num_inference_steps": steps, "guidance_scale": w if vp else w - 1.0}
  if vp:
    kwargs["eta"] = float(ev.eta)
  elif float(ev.eta) > 0:
    info["note"] = (f"diffusers' Euler sampler is the ODE (eta 0); the run evaluates with the "
                    f"SDE at noise level {float(ev.eta)}")
  info["pipeline_kwargs"] = kwargs
  return info, None


# ---------------------------------------------------------------------------------------------
# export


def check_output_folder(path: str, flag: str, *, empty: bool) -> str:
  """``path`` (absolute) if a command may write its files there: not a file, not under a file,
  and with ``empty`` not a folder that already holds something (one line naming ``flag``
  otherwise, as absl's UsageError: this runs before jax is imported)."""
  from absl.app import UsageError
  path = os.path.abspath(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise UsageError(f"{flag}={path} is a file; give a folder")
  parent = os.path.dirname(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise UsageError(f"{flag}={path} lies under {parent}, which is a file")
  if empty and os.path.isdir(path) and os.listdir(path):
    raise UsageError(f"{flag}={path} exists and is not empty; give a new folder (nothing was "
                     "overwritten)")
  return path


def check_dst(dst: str) -> str:
  """The pipeline export's ``--dst``: a new or empty folder."""
  return check_output_folder(dst, "--dst", empty=True)


def _write_json(path: str, data: dict) -> None:
  with open(path, "w") as f:
    json.dump(data, f, indent=2)
    f.write("\n")


def export_pipeline(run: Run, dst: str) -> dict:
  """Writes ``run``'s evaluated model as a diffusers pipeline folder ``dst`` (module
  docstring); returns the sampling recipe written beside ``model_index.json``. The folder is
  assembled in ``dst + '.incomplete'`` and renamed when complete."""
  dst = check_dst(dst)
  tmp = dst + ".incomplete"
  if os.path.isdir(tmp):
    shutil.rmtree(tmp)              # our own leftover of an interrupted export
  from didr_jax.convert import core  # lazy: jax-heavy; the checks run before it
  run.pipeline().export_diffusers(tmp)
  sched_path = os.path.join(tmp, "scheduler", "scheduler_config.json")
  info, scheduler = sampling_recipe(run, core.read_json(sched_path))
  if scheduler is not None:
    _write_json(sched_path, scheduler)
    index_path = os.path.join(tmp, "model_index.json")
    index = core.read_json(index_path)
    index["scheduler"] = ["diffusers", scheduler["_class_name"]]
    _write_json(index_path, index)
  _write_json(os.path.join(tmp, SAMPLING_FILE), info)
  if os.path.isdir(dst):
    os.rmdir(dst)                    # empty (check_dst)
  os.replace(tmp, dst)
  return info


def export_run(workdir: str, dst: str, *, epoch: int | None = None,
               adapters_only: bool = False, warn=_stderr) -> str:
  """Exports the run in ``workdir`` (module docstring); returns a one-line summary."""
  if adapters_only and not read_run_config(workdir).lora.enabled:
    _fail(f"{workdir}: the run was not trained with LoRA (a full fine-tune has no adapters); "
          "export the whole pipeline instead (leave out --adapters_only)")
  if not adapters_only:
    dst = check_dst(dst)
  run = load_run(workdir, epoch=epoch, master_weights=not adapters_only, warn=warn)
  if adapters_only:  # diffusers: pipe.load_lora_weights(dst) on the base pipeline
    from didr_jax.convert import lora_weights  # lazy: jax-heavy; the checks run before it
    path = lora_weights.save_lora_weights(run.model(), dst)
    return f"wrote the LoRA adapters of {run.workdir} (checkpoint step {run.step}) to {path}"
  info = export_pipeline(run, dst)
  return (f"exported what {run.workdir} evaluates ({run.config.method}, {info['sampler']}, "
          f"checkpoint step {run.step}) as a diffusers pipeline to {dst}; sampling settings in "
          f"{os.path.join(dst, SAMPLING_FILE)}")


def cli_export(workdir: str, dst: str, epoch: int | None, adapters_only: bool) -> None:
  """The export commands (``didr_jax.export``, ``didr_jax.convert.lora_export``): checks
  first, one CPU device per core as the run's config asks (before JAX starts), then
  ``export_run``; prints its summary."""
  from didr_jax.parallel import mesh as mesh_lib  # lazy: jax-heavy; the checks run before it
  from didr_jax.train import config as config_lib  # lazy: jax-heavy; the checks run before it
  if epoch is not None and epoch < 0:
    _fail(f"--epoch={epoch}: must be >= 0")
  check_output_folder(dst, "--dst", empty=not adapters_only)
  c = read_run_config(workdir)
  mesh_lib.split_cpu(config_lib.cpu_devices(c))
  print(export_run(workdir, dst, epoch=epoch, adapters_only=adapters_only))
