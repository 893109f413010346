"""``puzzle bench throughput MODEL_DIR``: measure a real model's tokens/s on a scenario.

The scenario comes from a run config (``--config FILE --scenario NAME``) or from flags
(``--batch``, ``--input-len``, ``--output-len``, ``--dtype``, ``--device``). The model is a parent in
Llama layout or a nemotron-nas child. The measurement is ``puzzle.profiling.bench.measure_throughput``
(static per-block KV cache, CUDA graphs on GPU, median of repeated generations). With ``--run RUN_URI``
the run's profiles for that scenario also give the throughput model's prediction and its error.

On CPU the figure depends on the torch thread count as much as on the model: ``--threads N`` sets it
(default: what ``puzzle run`` gives one local worker, the CPU count over the workers). A measurement
whose generations disagree by more than ``--max-rel-spread`` ((p90 - p10) / median; default the
config's ``profile.max_rel_spread``) prints a warning: the machine was busy and the figure is not the model's.

    puzzle bench throughput examples/tiny/parent --batch 8 --input-len 64 --output-len 64 --threads 1
    puzzle bench throughput runs/tiny-.../child/sol-0 --config examples/tiny/puzzle.yaml --scenario cpu-b8 \\
        --run file://./runs/tiny-... --json out.json
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from puzzle.commands import run_uri
from puzzle.config import ProfileConfig, Scenario, format_validation_error, load_config
from puzzle.errors import UserError


def register(sub) -> None:
    p = sub.add_parser("bench", help="measure a model on the hardware (throughput)")
    bs = p.add_subparsers(dest="bench_command", metavar="WHAT", required=True)
    t = bs.add_parser("throughput", help="tokens/s of a model on a scenario (prefill + greedy decode)")
    t.add_argument("model_dir", type=Path, help="a Llama-layout parent or nemotron-nas child directory")
    t.add_argument("--config", type=Path, default=None, help="run config holding the scenario named by --scenario")
    t.add_argument("--scenario", default=None, help="name of a profile.scenarios entry of --config")
    t.add_argument("--batch", type=int, default=None, help="sequences per batch (without --config)")
    t.add_argument("--input-len", type=int, default=None, help="prompt tokens (without --config)")
    t.add_argument("--output-len", type=int, default=None, help="generated tokens (without --config)")
    t.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (without --config)")
    t.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (without --config)")
    t.add_argument("--threads", type=int, default=None,
                   help="torch threads while measuring (default: the CPU count over puzzle run's local workers)")
    t.add_argument("--max-rel-spread", type=float, default=None,
                   help="warn when (p90 - p10) / median of the generations is above this "
                        "(default: the config's profile.max_rel_spread)")
    t.add_argument("--repeats", type=int, default=3, help="timed generations; the median is reported")
    t.add_argument("--warmup", type=int, default=1, help="untimed generations first")
    t.add_argument("--no-cuda-graphs", action="store_true", help="run eagerly on GPU (for comparison)")
    t.add_argument("--backend", choices=("torch", "vllm"), default="torch",
                   help="torch (default, what profiles measure) or vllm (needs vLLM installed)")
    t.add_argument("--run", default=None, metavar="RUN_URI", type=run_uri, help="also predict from this run's profiles")
    t.add_argument("--json", type=Path, default=None, help="write the result here as JSON")
    t.set_defaults(func=_throughput)


def default_threads() -> int:
    """Threads one worker of ``puzzle run`` gets here: the CPU count over its default worker count."""
    from puzzle.local import default_workers

    return max(1, (os.cpu_count() or 1) // default_workers())


def _spread_bound(args) -> float:
    if args.max_rel_spread is not None:
        if not args.max_rel_spread > 0:
            raise UserError(f"--max-rel-spread: {args.max_rel_spread} is not allowed; must be > 0")
        return args.max_rel_spread
    if args.config is not None:
        return load_config(args.config).profile.max_rel_spread
    return float(ProfileConfig.model_fields["max_rel_spread"].default)


def scenario_from_args(args) -> Scenario:
    """The scenario of ``--config/--scenario`` or of the flags; errors name the flag and the value."""
    flags = {"--batch": args.batch, "--input-len": args.input_len, "--output-len": args.output_len}
    if args.config is not None or args.scenario is not None:
        if args.config is None or args.scenario is None:
            raise UserError("--config and --scenario go together: give both, or neither and use --batch/--input-len/--output-len")
        given = [k for k, v in flags.items() if v is not None]
        if given:
            raise UserError(f"{', '.join(given)}: not allowed with --config/--scenario (the scenario defines them)")
        cfg = load_config(args.config)
        names = {s.name: s for s in cfg.profile.scenarios}
        if args.scenario not in names:
            raise UserError(f"--scenario: {args.scenario!r} is not in {args.config}; allowed: {sorted(names)}")
        return names[args.scenario]
    missing = [k for k, v in flags.items() if v is None]
    if missing:
        raise UserError(f"{', '.join(missing)}: required without --config/--scenario")
    try:
        return Scenario(name="cli", batch_size=args.batch, input_len=args.input_len, output_len=args.output_len,
                        dtype=args.dtype, device=args.device)
    except ValidationError as err:
        raise UserError(f"scenario flags: {format_validation_error(err, Scenario)}") from None


def _throughput(args) -> int:
    from puzzle.profiling.bench import DeviceAbsentError, measure_throughput, measure_throughput_vllm

    sc = scenario_from_args(args)
    if not (args.model_dir / "config.json").is_file():
        raise UserError(f"MODEL_DIR: {str(args.model_dir)!r} has no config.json; give a Hugging Face model directory")
    if args.repeats < 1:
        raise UserError(f"--repeats: {args.repeats} is not allowed; must be >= 1")
    threads = default_threads() if args.threads is None else args.threads
    if threads < 1:
        raise UserError(f"--threads: {threads} is not allowed; must be >= 1")
    bound = _spread_bound(args)
    import torch

    torch.set_num_threads(threads)
    try:
        if args.backend == "vllm":
            meas = measure_throughput_vllm(args.model_dir, sc, repeats=args.repeats)
        else:
            meas = measure_throughput(args.model_dir, sc, warmup=args.warmup, repeats=args.repeats,
                                      cuda_graphs=not args.no_cuda_graphs)
    except (DeviceAbsentError, RuntimeError) as err:
        if isinstance(err, DeviceAbsentError) or "vllm" in str(err).lower():
            raise UserError(str(err)) from None
        raise
    out = {"model_dir": str(args.model_dir), "measured": meas.to_dict(), "max_rel_spread": bound,
           "stable": meas.rel_spread <= bound}
    print(f"{args.model_dir} on {sc.name} (batch {sc.batch_size}, {sc.input_len} in, {sc.output_len} out, "
          f"{sc.dtype}, {meas.device}): {meas.tokens_per_s:.1f} tokens/s (prefill {meas.prefill_s * 1e3:.2f} ms, "
          f"decode {meas.decode_s:.4f} s, {meas.decode_step_s * 1e3:.3f} ms a step; spread "
          f"{meas.rel_spread * 100:.1f}%)")
    if meas.rel_spread > bound:
        load = ""
        if hasattr(os, "getloadavg"):
            load = f"; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
        print(f"warning: the {meas.repeats} generations disagree by {meas.rel_spread:.0%} ((p90 - p10) / median), "
              f"above {bound * 100:.3g}% (--max-rel-spread){load}: the machine was busy, so this figure is not "
              "the model's; measure on a quieter machine, with fewer --threads or with more --repeats",
              file=sys.stderr)
    if args.run:
        from puzzle.model import ModelConfig
        from puzzle.profiling.throughput import load_scenario_profile, predict
        from puzzle.store import open_store

        raw = json.loads((args.model_dir / "config.json").read_text())
        if raw.get("model_type") == "nemotron-nas":
            blocks = ModelConfig.from_json_file(args.model_dir / "config.json").block_configs
        else:
            from puzzle.model.io import parent_model_config

            blocks = parent_model_config(raw, str(args.model_dir / "config.json")).block_configs
        pred = predict(load_scenario_profile(open_store(args.run), sc.name), blocks)
        err = pred.tokens_per_s / meas.tokens_per_s - 1
        out["predicted"] = pred.to_dict()
        out["error"] = err
        print(f"predicted {pred.tokens_per_s:.1f} tokens/s{' (estimate)' if pred.estimate else ''}: "
              f"error {err * 100:+.2f}%")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return 0
