"""Step terms: what a run plugs into its step besides the adapter, each with its config class, and their registry.

    registry.py               the one registry: config class -> where the run's configuration holds it
    apt.py, apt_config.py     APT (batch, loss and run roles)
    auto.py, auto_config.py   auto preservation (batch and run roles; its probes measured by measure/validation.py)
    mask.py                   masked training's fit weights and background keep term (batch, loss, run)
    min_snr.py                min-SNR-γ weighting (loss)
    keep_local.py             the layer-local keep estimator of the CAT term (loss, run)
    ema.py                    an EMA of the adapter weights (run)
    flip.py                   CatVersion's flips (batch; its trainer adds it)

A term module implements the roles of `step.plugs` it needs; its config class (`active`, `metadata(history)`,
`build(...)`) builds it, and the term module does not import its config back. May import step, families (APT's
default layers) and measure (auto preservation's measurement).
"""
