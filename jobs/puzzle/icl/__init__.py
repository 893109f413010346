"""In-context compositional generalization with diverse demonstrations (Cover-LS; Levy et al., ACL 2023).

- :mod:`puzzle.icl.datasets`: SCAN splits and the GeoQuery-like FunQL language as ICL datasets (``load_dataset``).
- :mod:`puzzle.icl.structures`: local structures of programs, the paper's (default) and the fragments variant.
- :mod:`puzzle.icl.selection`: Random, Top-K (BM25), Cover-Utt and Cover-LS demonstration selection, per mode.
- :mod:`puzzle.icl.benchmark`: ``plan_icl`` / ``run_icl_benchmark`` and the parent/child ``retention_table``.

Models are reached through :class:`puzzle.generation.TextGenerator`. Run
``python benchmarks/bench_icl.py --model DIR`` for the benchmark table of one model.
"""
