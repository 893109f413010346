"""CLI subcommands: one module per subcommand, each with ``register(subparsers)``.

``puzzle.cli`` discovers every module in this package, so adding a subcommand never edits
a shared list. ``register`` adds a parser and sets ``func`` (called with the parsed args,
returning an exit code).
"""
