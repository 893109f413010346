"""In-context compositional generalization with diverse demonstrations (Cover-LS; Levy et al., ACL 2023).

- :mod:`puzzle.icl.datasets`: SCAN splits and a GeoQuery-like FunQL language (``load_dataset``).
- :mod:`puzzle.icl.structures`: programs as trees and their local structures.
- :mod:`puzzle.icl.selection`: Random, Top-K (BM25), Cover-Utt and Cover-LS demonstration selection.
- :mod:`puzzle.icl.generation`: the ``TextGenerator`` protocol and a Hugging Face adapter.
- :mod:`puzzle.icl.benchmark`: ``run_icl_benchmark`` and the parent/child ``retention_table``.

Run ``python benchmarks/bench_icl.py --model DIR`` for the benchmark table of one model.
"""
