"""cli: the `smoothq` command. One module per subcommand translates its flags into a Recipe and the
arguments of one library call; parsing needs no torch (`smoothq --help` is instant).

May import: every layer below.
"""
