"""``puzzle config validate FILE`` and ``puzzle config schema``."""

from __future__ import annotations

import json

from puzzle.config import json_schema, load_config


def register(sub) -> None:
    p = sub.add_parser("config", help="validate a run config or print its JSON schema")
    cs = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    v = cs.add_parser("validate", help="check a run config; print the effective config")
    v.add_argument("file")
    v.add_argument("--quiet", action="store_true", help="print nothing when valid")
    v.set_defaults(func=_validate)
    s = cs.add_parser("schema", help="print the run config's JSON schema")
    s.set_defaults(func=_schema)


def _validate(args) -> int:
    cfg = load_config(args.file)
    if not args.quiet:
        print(f"{args.file}: valid")
        print(cfg.to_yaml(), end="")
    return 0


def _schema(args) -> int:
    print(json.dumps(json_schema(), indent=2))
    return 0
