"""The subcommands of `kdsb`, one module each: `HELP`, `add_arguments(parser)`, `run(args)`.
Their shared input- and output-path checks: `kdsb.io.paths`. This package must stay light:
`kdsb --help` imports it.
"""
