"""configs/tdmr1_sdxl.py and configs/tdmr1_zimage.py train one iteration on tiny random SDXL /
Z-Image folders (with a JPEG-size reward in place of PickScore: any registered reward is used as
a black box): every network moves, the metrics are finite, the student's 4-step grid is the
scheduler's. Each compiles its rollout and three update programs (the slowest TDM tests)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from didr_jax.losses import tdm as tdm_losses
from didr_jax.testing import tiny
from test_tdm_trainer import _real_epoch  # tests/ is on sys.path (pytest's rootdir import)


def test_tdmr1_sdxl_config_trains_on_tiny_folders(tmp_path):
  folder = str(tmp_path / "sdxl")
  tiny.save_tiny_sd(folder, kind="sdxl", seed=5)
  tr, _ = _real_epoch("tdmr1_sdxl", folder)
  # steps_offset 1, leading spacing: DDIM's 4-step grid of the tiny scheduler
  assert list(tr.grid.times) == [751, 501, 251, 1, -249]


def test_tdmr1_zimage_config_trains_on_tiny_folders(tmp_path):
  from didr_jax.testing import tiny_zimage
  folder = str(tmp_path / "zimage")
  tiny_zimage.save_tiny_zimage(folder, seed=2)
  tr, _ = _real_epoch("tdmr1_zimage", folder)
  u = np.array([1.0, 0.75, 0.5, 0.25])
  np.testing.assert_allclose(tr.grid.times, list(3 * u / (1 + 2 * u)) + [0.0], rtol=1e-6)
  # the flow student step is Euler: x_{j+1} = x_j - (sig_j - sig_{j+1}) v
  x = jnp.ones((1, 2, 2, 1))
  v = jnp.full((1, 2, 2, 1), 0.5)
  x_next, _, _ = tdm_losses.student_step(v, x, 0.0, 1.0, 0.1, 0.9, "flow")
  np.testing.assert_allclose(x_next, x - 0.1 * v, rtol=1e-6)
