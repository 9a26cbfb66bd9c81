"""Placeholder while this subcommand is being written; its owner replaces this file."""

HELP = "train the GMCAE on 3D patches (placeholder: being written)"


def add_arguments(parser):
    pass


def run(args):
    raise NotImplementedError
