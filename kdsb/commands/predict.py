"""Placeholder while this subcommand is being written; its owner replaces this file."""

HELP = "write an id,cancer CSV (placeholder: being written)"


def add_arguments(parser):
    pass


def run(args):
    raise NotImplementedError
