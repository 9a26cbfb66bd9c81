"""Placeholder while this subcommand is being written; its owner replaces this file."""

HELP = "the whole pipeline on a phantom cohort (placeholder: being written)"


def add_arguments(parser):
    pass


def run(args):
    raise NotImplementedError
