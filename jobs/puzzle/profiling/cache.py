"""The profile cache: measured profiles shared across runs, content-addressed like the BLD library.

A profile measured on a noisy CPU differs from one run to the next, and so would the child the solver
picks from it. With ``profile.reuse`` (default on) a ``profile`` unit first looks for a record that an
earlier run measured under the same conditions and copies it into its run; only when there is none
(or it is no longer within the run's ``profile.max_rel_spread``) does it measure, and then it also
writes the cache. So a rerun of the same config on the same machine solves the same problem, bit for bit.

Layout beside the runs (``<store.uri>/profiles/``, see :mod:`puzzle.layout`)::

    profiles/<digest>/key.json         what the digest was computed from (for humans and audits)
    profiles/<digest>/<entry>.json     one variant's measured record; <entry> is its shape:
                                       attn_g<G>, attn_linear, ffn_i<intermediate>, ffn_linear, non_block

The digest is the sha256 of everything that changes a measurement (:func:`cache_key`): the parent's
shape fields the profiler reads (hidden size, heads, head_dim, vocabulary, tied embeddings, the layer
count, which caps the replicas), the scenario's batch, lengths, dtype and device type (not its name:
two runs that call one scenario differently share it), the device's identity (GPU name, or CPU model and
torch thread count), torch and CUDA versions, the timing settings (warm-up, repeats, decode points, CUDA
graphs, clock) and :data:`FORMAT_VERSION`. The variant is the entry's name, by shape, so ``ffn_m1.0``
and the ``ffn_i<size>`` of the same size share one entry. Left out on purpose: the seed (random weights;
time does not depend on their values) and the spread bound and attempts (a cached record is judged
against the reading run's own bound each time).

Only stable measured records enter the cache; estimates and no_op records cost nothing to redo and are
never cached. A reused record says so: ``"reused": {"from": <uri>, "digest": ..., "measured_by": ...}``.
"""

from __future__ import annotations

import copy
import datetime as _dt
import logging
from collections.abc import Mapping
from typing import Any

import torch

from puzzle import layout
from puzzle.config import ProfileConfig, Scenario
from puzzle.layout import digest_of
from puzzle.model import AttentionVariant, FFNVariant, ModelConfig
from puzzle.profiling.device import device_name, target_device
from puzzle.profiling.profiler import parse_variant, profile_scenario, profile_unit
from puzzle.profiling.throughput import unstable
from puzzle.profiling.timing import cpu_clock
from puzzle.store import Store

log = logging.getLogger(__name__)

#: Bumped whenever the meaning of a cached record changes (method, replicas, fields), so records of an
#: older profiler are never mistaken for new ones.
FORMAT_VERSION = 4  # 3: CPU scenarios in turns, fitted to two whole models; 4: CPU variants timed as whole models


def entry_name(kind: str, variant: AttentionVariant | FFNVariant | None) -> str:
    """The cache entry of a variant, by shape (``ffn_m1.0`` at hidden 192 is ``ffn_i128``)."""
    if kind == "non_block" or variant is None:
        return "non_block"
    if isinstance(variant, FFNVariant) and variant.kind == "swiglu":
        return f"ffn_i{variant.intermediate_size}"
    return variant.name


def cache_key(cfg: ModelConfig, scenario: Scenario, settings: ProfileConfig, device: torch.device,
              interleaved: bool = False) -> dict[str, Any]:
    """What the digest of a profile-cache root is computed from (see the module docstring). Records of a
    scenario measured interleaved (:func:`puzzle.profiling.profiler.profile_scenario`) live under their
    own digest: they are measured together (on a CPU, as whole models less one no-op model), and only
    reused as the whole set they were measured in."""
    dev: dict[str, Any] = {"name": device_name(device), "torch": torch.__version__}
    if device.type == "cuda":
        dev["cuda"] = torch.version.cuda
        dev["capability"] = list(torch.cuda.get_device_capability(device))
    return {
        "format": FORMAT_VERSION,
        "model": {"hidden_size": cfg.hidden_size, "num_attention_heads": cfg.num_attention_heads,
                  "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
                  "tie_word_embeddings": cfg.tie_word_embeddings, "num_hidden_layers": cfg.num_hidden_layers},
        "scenario": {"batch_size": scenario.batch_size, "input_len": scenario.input_len,
                     "output_len": scenario.output_len, "dtype": scenario.dtype,
                     "device": torch.device(scenario.device).type},
        "device": dev,
        "settings": {"warmup": settings.warmup, "repeats": settings.repeats, "decode_points": settings.decode_points,
                     "rebuilds": settings.rebuilds,
                     "cuda_graphs": settings.cuda_graphs and device.type == "cuda",
                     "clock": "cuda_events" if device.type == "cuda" else cpu_clock(settings.cpu_clock),
                     **({"interleaved": True} if interleaved else {})},
    }


class ProfileCache:
    """One root ``profiles/<digest>/`` of the cache (a Store rooted there)."""

    def __init__(self, root: Store, key: Mapping[str, Any]) -> None:
        self.key = dict(key)
        self.digest = digest_of(key)
        self.store = root.child(layout.profile_cache_root(self.digest))

    @property
    def uri(self) -> str:
        return self.store.uri

    def lookup(self, entry: str, max_rel_spread: float) -> dict[str, Any] | None:
        """The cached record of ``entry`` when there is one within ``max_rel_spread``; else None."""
        key = layout.profile_cache_entry(entry)
        if not self.store.exists(key):
            return None
        rec = self.store.get_json(key)
        st = rec.get("stability") or {}
        if not st.get("measured") or unstable(rec, max_rel_spread):
            log.info("profile cache %s/%s: spread %s is above profile.max_rel_spread %s; measuring again",
                     self.uri, key, st.get("rel_spread"), max_rel_spread)
            return None
        return rec

    def save(self, entry: str, rec: Mapping[str, Any]) -> None:
        # Concurrent units write identical key.json files; every write is atomic.
        if not self.store.exists(layout.PROFILE_CACHE_KEY):
            self.store.put_json(layout.PROFILE_CACHE_KEY, self.key)
        self.store.put_json(layout.profile_cache_entry(entry), dict(rec))


def profile_unit_cached(cfg: ModelConfig, kind: str, name: str, scenario: Scenario, settings: ProfileConfig,
                        root: Store | None, seed: int = 0, origin: Mapping[str, Any] | None = None
                        ) -> dict[str, Any]:
    """``profile_unit`` through the cache at ``root`` (the store that holds the runs; None: no cache).

    A stable cached record is copied with this run's scenario and variant name and a ``reused`` field;
    otherwise the unit is measured, and a stable measurement is written to the cache with ``origin``
    (which run and unit measured it) under ``measured_by``.
    """
    variant = parse_variant(kind, name, cfg)
    device = target_device(scenario)
    cacheable = root is not None and settings.reuse and device is not None and not (variant is not None and variant.no_op)
    if not cacheable:
        return profile_unit(cfg, kind, name, scenario, settings, seed=seed)
    assert root is not None and device is not None
    cache = ProfileCache(root, cache_key(cfg, scenario, settings, device))
    entry = entry_name(kind, variant)
    hit = cache.lookup(entry, settings.max_rel_spread)
    if hit is not None:
        rec = _reused(hit, cache, entry, scenario, name)
        log.info("profile %s/%s: reused %s", scenario.name, name, rec["reused"]["from"])
        return rec
    rec = profile_unit(cfg, kind, name, scenario, settings, seed=seed)
    rec["measured_by"] = {**(origin or {}), "at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}
    written = bool(rec["stability"]["stable"])  # an unstable record must not be reused by the next run
    if written:
        cache.save(entry, rec)
    rec["reused"] = None
    rec["cache"] = {"digest": cache.digest, "written": written,
                    "uri": f"{cache.uri}/{layout.profile_cache_entry(entry)}"}
    return rec


def _reused(hit: Mapping[str, Any], cache: ProfileCache, entry: str, scenario: Scenario, name: str) -> dict[str, Any]:
    rec = copy.deepcopy(dict(hit))
    rec.pop("cache", None)
    rec["scenario"] = scenario.model_dump(mode="json")
    rec["variant"] = name
    rec["reused"] = {"from": f"{cache.uri}/{layout.profile_cache_entry(entry)}", "digest": cache.digest,
                     "measured_by": hit.get("measured_by")}
    return rec


def profile_scenario_cached(cfg: ModelConfig, units: list[tuple[str, str]], scenario: Scenario,
                            settings: ProfileConfig, root: Store | None, seed: int = 0,
                            origin: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """``profile_scenario`` through the cache at ``root``: reused only as a whole set.

    The records of an interleaved measurement are comparable with each other (same rounds, same
    calibration), not with records of another session. So the cache is read only when every measured
    variant has a stable entry and all of them come from one session; otherwise every variant is
    measured again, together, and (when all are stable) the whole set is written.
    """
    device = target_device(scenario)
    if root is None or not settings.reuse or device is None:
        return profile_scenario(cfg, units, scenario, settings, seed=seed)
    cache = ProfileCache(root, cache_key(cfg, scenario, settings, device, interleaved=True))
    variants = [(kind, name, parse_variant(kind, name, cfg)) for kind, name in units]
    measured = [(kind, name, v) for kind, name, v in variants if not (v is not None and v.no_op)]
    hits = {entry_name(k, v): cache.lookup(entry_name(k, v), settings.max_rel_spread) for k, _, v in measured}
    sessions = {((h.get("method") or {}).get("interleaved") or {}).get("session") for h in hits.values() if h}
    if hits and all(hits.values()) and len(sessions) == 1 and None not in sessions:
        log.info("profile %s: reused %d interleaved records of session %s from %s", scenario.name, len(hits),
                 sessions.pop(), cache.uri)
        reused = {name: _reused(hits[entry_name(k, v)], cache, entry_name(k, v), scenario, name)
                  for k, name, v in measured}
        return [reused[name] if name in reused else profile_unit(cfg, kind, name, scenario, settings, seed=seed)
                for kind, name, _ in variants]
    recs = profile_scenario(cfg, units, scenario, settings, seed=seed)
    stamp = {**(origin or {}), "at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}
    written = all(r["stability"]["stable"] for r in recs)  # a partial or unstable set must not be reused
    for (kind, name, v), rec in zip(variants, recs):
        if v is not None and v.no_op:
            continue
        rec["measured_by"] = stamp
        if written:
            cache.save(entry_name(kind, v), rec)
        rec["reused"] = None
        rec["cache"] = {"digest": cache.digest, "written": written,
                        "uri": f"{cache.uri}/{layout.profile_cache_entry(entry_name(kind, v))}"}
    return recs
