"""The exact benchmark's ``backbone.kind`` names (no heavy imports: the config schema reads them).
"exact_<problem>" runs the VP (epsilon) family, "exact_<problem>_flow" flow matching; the
problems are ``didr_jax.exact.backbone.PROBLEMS``."""

PROBLEM_NAMES = ("ring2d", "mix16d")
KINDS = tuple(f"exact_{p}{s}" for p in PROBLEM_NAMES for s in ("", "_flow"))
FLOW_KINDS = tuple(k for k in KINDS if k.endswith("_flow"))
