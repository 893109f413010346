"""``puzzle config validate FILE [--parent]`` and ``puzzle config schema``."""

from __future__ import annotations

import json

from puzzle.config import json_schema, load_config


def register(sub) -> None:
    p = sub.add_parser("config", help="validate a run config or print its JSON schema")
    cs = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    v = cs.add_parser("validate", help="check a run config; print the effective config")
    v.add_argument("file")
    v.add_argument("--quiet", action="store_true", help="print nothing when valid")
    v.add_argument("--parent", action="store_true",
                   help="also check the search space against the parent's config.json (a local parent.uri): "
                   "n_heads_in_group, and the rules of the search_space.serving engines (head size, FFN grid)")
    v.set_defaults(func=_validate)
    s = cs.add_parser("schema", help="print the run config's JSON schema")
    s.set_defaults(func=_schema)


def _validate(args) -> int:
    cfg = load_config(args.file)
    if args.parent:
        _check_parent(cfg)
    if not args.quiet:
        print(f"{args.file}: valid")
        print(cfg.to_yaml(), end="")
    return 0


def _check_parent(cfg) -> None:
    """What ``puzzle run`` checks before a run exists: the config against the parent's config.json."""
    from puzzle.errors import UserError
    from puzzle.planning import check_against_parent, read_parent_config

    parent = read_parent_config(cfg)
    if parent is None:
        raise UserError(f"--parent: parent.uri {cfg.parent.uri!r} is a hub name; prepare checks it when the run starts")
    check_against_parent(cfg, parent)


def _schema(args) -> int:
    print(json.dumps(json_schema(), indent=2))
    return 0
