"""``puzzle parent corpus`` and ``puzzle parent train-tiny``: the project's own tiny parent.

``corpus`` writes the training/validation text (examples/tiny/data); ``train-tiny`` trains the
small Llama on the same seeded stream and saves it as a Hugging Face directory (safetensors).
"""

from __future__ import annotations

import dataclasses
import json

from puzzle.errors import UserError


def register(sub) -> None:
    from puzzle.tiny_parent import TinyParentConfig

    p = sub.add_parser("parent", help="build the project's tiny parent (corpus, tokenizer, model)")
    ps = p.add_subparsers(dest="parent_command", metavar="ACTION", required=True)

    c = ps.add_parser("corpus", help="write train.txt and valid.txt of in-context SCAN episodes + filler")
    c.add_argument("--out", required=True, help="directory for train.txt and valid.txt")
    c.add_argument("--seed", type=int, default=TinyParentConfig.seed)
    c.add_argument(
        "--train-chars",
        type=int,
        default=TinyParentConfig.tokenizer_chars,
        help="size of train.txt in characters (the BPE's training text)",
    )
    c.add_argument("--valid-chars", type=int, default=300_000, help="size of valid.txt in characters")
    c.add_argument(
        "--pin-filler",
        action="store_true",
        help="first (re)write examples/tiny/data/filler.txt from this Python's docstrings",
    )
    c.set_defaults(func=_corpus)

    t = ps.add_parser("train-tiny", help="train the tiny Llama parent from scratch (CPU, deterministic)")
    t.add_argument("--out", required=True, help="output directory (Hugging Face format, safetensors)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    defaults = TinyParentConfig()
    for f in dataclasses.fields(TinyParentConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            t.add_argument(flag, type=_parse_bool, default=getattr(defaults, f.name), metavar="true|false")
        else:
            kind = {"int": int, "float": float}.get(str(f.type), type(getattr(defaults, f.name)))
            t.add_argument(
                flag,
                type=kind,
                default=getattr(defaults, f.name),
                help=f"default: {getattr(defaults, f.name)}",
            )
    t.set_defaults(func=_train)


def _parse_bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise ValueError(text)


def _corpus(args) -> int:
    from puzzle.data.corpus import write_corpus, write_filler

    for name in ("train_chars", "valid_chars"):
        if getattr(args, name) < 1000:
            raise UserError(
                f"--{name.replace('_', '-')}: value {getattr(args, name)} is not allowed; must be >= 1000"
            )
    if args.pin_filler:
        print(f"filler: {write_filler()}")
    paths = write_corpus(args.out, seed=args.seed, train_chars=args.train_chars, valid_chars=args.valid_chars)
    for part, path in paths.items():
        print(f"{part}: {path} ({path.stat().st_size} bytes)")
    return 0


def _train(args) -> int:
    from puzzle.tiny_parent import TinyParentConfig, train_tiny_parent

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TinyParentConfig)}
    try:
        cfg = TinyParentConfig(**values)
    except ValueError as err:
        name, _, rest = str(err).partition(":")
        raise UserError(f"--{name.replace('_', '-')}:{rest}") from None
    summary = train_tiny_parent(args.out, cfg, progress=not args.no_progress)
    print(json.dumps(summary, indent=2))
    return 0
