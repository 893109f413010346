"""``puzzle export gguf CHILD_DIR OUT.gguf``: write a child as the GGUF file llama.cpp runs.

    puzzle fetch file://./runs/tiny-... ./child
    puzzle export gguf ./child child.gguf --dtype f16
    llama-cli -m child.gguf -p "..."        # or llama-cpp-python: llama_cpp.Llama(model_path="child.gguf")

The writer is ``puzzle.export.gguf.export_gguf`` (its docstring has the per-layer rules). A child that
llama.cpp cannot run (a linear FFN), or whose tokenizer it cannot represent, is refused with exit 2.
"""

from __future__ import annotations

from pathlib import Path

from puzzle.errors import UserError


def register(sub) -> None:
    # puzzle.export.gguf imports torch: only when the command runs, so `puzzle --help` stays fast
    p = sub.add_parser("export", help="write a child in another engine's format (GGUF for llama.cpp)")
    es = p.add_subparsers(dest="export_command", metavar="FORMAT", required=True)
    g = es.add_parser("gguf", help="GGUF for llama.cpp (architecture 'deci')")
    g.add_argument("child", type=Path, metavar="CHILD_DIR", help="a nemotron-nas child directory (puzzle fetch)")
    g.add_argument("out", type=Path, metavar="OUT.gguf", help="the GGUF file to write")
    g.add_argument("--dtype", default="f16", metavar="f32|f16|bf16",
                   help="type of the matrices (norms stay f32, as llama.cpp's converter keeps them); default f16")
    g.add_argument("--pre-tokenizer", default=None, metavar="NAME",
                   help="write this llama.cpp pre-tokenizer name (e.g. superbpe) when the child's is not one "
                        "llama.cpp implements; text may then tokenize differently there (the refusal lists names)")
    g.add_argument("--force", action="store_true", help="overwrite OUT.gguf if it exists")
    g.set_defaults(func=_gguf)


def _gguf(args) -> int:
    import logging

    from puzzle.export.gguf import export_gguf

    logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer logs every file it opens at INFO

    if args.out.exists() and not args.force:
        raise UserError(f"OUT.gguf: {str(args.out)!r} exists; choose another path or pass --force")
    if args.out.is_dir():
        raise UserError(f"OUT.gguf: {str(args.out)!r} is a directory; give a file path")
    s = export_gguf(args.child, args.out, dtype=args.dtype, pre_tokenizer=args.pre_tokenizer)
    for note in s.notes:
        print(f"note: {note}")
    print(f"wrote {s.path}: {s.n_tensors} tensors, {s.n_bytes / 2**20:.1f} MiB of {s.dtype} weights, "
          f"{len(s.layers)} layers, pre-tokenizer {s.pre_tokenizer!r}")
    print("  head_count          " + " ".join(str(p.head_count) for p in s.layers))
    print("  head_count_kv       " + " ".join(str(p.head_count_kv) for p in s.layers))
    print("  feed_forward_length " + " ".join(str(p.feed_forward_length) for p in s.layers))
    return 0
