"""Placeholder while this subcommand is being written; its owner replaces this file."""

HELP = "log loss, AUC and accuracy of a prediction CSV (placeholder: being written)"


def add_arguments(parser):
    pass


def run(args):
    raise NotImplementedError
