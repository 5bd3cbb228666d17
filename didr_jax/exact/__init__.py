"""The exact benchmark (issue 27): Gaussian-mixture data with a closed-form denoiser, reward-tilted
optima in closed form (linear, quadratic) or sampled exactly (a box indicator), the exact Diffused
Reward Score, and sample metrics against the exact laws."""

from didr_jax.exact.metrics import (component_errors, component_stats, energy_distance, evaluate,
                                    sample_law, sliced_wasserstein)
from didr_jax.exact.mixture import (GaussianMixture, component_log_weights, denoise, log_prob,
                                    noisy_log_prob, posterior_mean, random_mixture,
                                    responsibilities, ring_2d, sample)
from didr_jax.exact.tilt import (BoxTilt, box_reward, exact_drs, linear_reward, quadratic_reward,
                                 tilt_linear, tilt_quadratic)
