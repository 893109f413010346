"""Hardware profiling of block variants and the throughput model that predicts an assembled child.

- ``puzzle.profiling.throughput``: ``load_scenario_profile(store, scenario)``, ``predict(profile,
  block_configs) -> Prediction``, ``variant_costs(profile, kind, name)``: what solve and evaluate use.
- ``puzzle.profiling.profiler``: ``profile_unit(...)`` measures one variant (or the non-block parts) on
  one scenario (a GPU unit); ``profile_scenario(...)`` measures all of a scenario's variants in turns,
  on a CPU each as a whole model of it less one of no-op layers (a CPU unit); the ``profile`` step writes each
  record to ``profile/<scenario>/<variant>.json``.
- ``puzzle.profiling.cache``: ``profile_unit_cached(...)`` / ``profile_scenario_cached(...)``, the same
  through the profile cache beside the runs (``profiles/<digest>/``), so a rerun on the same device and
  shapes reuses stable profiles (a CPU scenario's only as the whole set measured together).
- ``puzzle.profiling.roofline``: the analytic estimate used only when the target device is absent.
- ``puzzle.profiling.bench``: ``measure_throughput(model, scenario)``, a whole model's tokens/s with
  the same method (``puzzle bench throughput``); ``measure_interleaved(models, scenario)`` several
  models' generations in turns (a child and its parent, in evaluation).
- ``puzzle.profiling.engine`` / ``timing``: the shared inference path (per-block KV cache, CUDA graphs)
  and the timing method (CUDA events, the thread's CPU time or the wall clock, warm-up, median of
  repeats, re-measured when the repeats disagree by more than the bound).
"""

from puzzle.profiling.throughput import (
    Prediction,
    ProfileError,
    ScenarioProfile,
    UnstableProfileError,
    VariantCost,
    load_scenario_profile,
    predict,
    variant_costs,
)

__all__ = [
    "Prediction",
    "ProfileError",
    "ScenarioProfile",
    "UnstableProfileError",
    "VariantCost",
    "load_scenario_profile",
    "predict",
    "variant_costs",
]
