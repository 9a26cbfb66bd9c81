"""The `kdsb` command: one entry point, one module per subcommand under `kdsb.commands`.

Each subcommand module exposes `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`
and imports nothing heavy at module level, so `kdsb --help` is instant; TensorFlow is imported
inside `run` only by the subcommands that train or predict.

Exit status: 0 success, 1 when the data was at fault (some patients failed, a bad CSV, …),
2 for a usage error, 130 when interrupted (Ctrl-C). Errors caused by input are printed on one
line, never as a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import select
import sys
import traceback

from kdsb import interrupts
from kdsb._version import __version__
from kdsb.errors import KdsbError, UsageError, is_out_of_memory, out_of_memory_line
from kdsb.interrupts import EXIT_INTERRUPTED

# Subcommand name → module under kdsb.commands, in the order of the pipeline.
SUBCOMMANDS = {
    "synth": "synth",
    "preprocess": "preprocess",
    "train-gmcae": "train_gmcae",
    "train-classifier": "train_classifier",
    "predict": "predict",
    "evaluate": "evaluate",
    "explain": "explain",
    "embed": "embed",
    "export": "export",
    "demo": "demo",
}

EXIT_OK, EXIT_DATA_ERROR, EXIT_USAGE = 0, 1, 2  # and EXIT_INTERRUPTED, 130
EXIT_READER_GONE = 141  # 128 + SIGPIPE (13): what a shell reports of a program a closed pipe ends
RETRACING_MESSAGE = "triggered tf.function retracing"  # TensorFlow's warning, kept under -v
# Libraries whose debug lines stay out of -v (Matplotlib's font search: hundreds of lines).
QUIET_LIBRARIES = ("matplotlib", "PIL", "h5py", "urllib3", "asyncio")
# The options that lower a command's memory, by their argparse dest: the out-of-memory advice
# names those the failed command has (it used to name --width to `predict`).
MEMORY_OPTIONS = (("batch_size", "a smaller --batch-size"), ("width", "--width"),
                  ("patch_size", "--patch-size"), ("tile_z", "--tile-z 32 (head spp)"),
                  ("downscale", "--downscale 2"), ("workers", "fewer --workers"))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: …)" to each option's help, except where the default is None (the
    option is off unless given, or its help says what happens without it) and to a flag that is
    off unless given."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or (action.nargs == 0 and action.default is False):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `kdsb` with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="kdsb",
        description="3D CT lung research: DICOM → lung volumes → GMCAE → SPP3D classifier.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kdsb {__version__}")
    _add_verbosity(parser, default=False)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(f"kdsb.commands.{module_name}")
        sub = subparsers.add_parser(
            name,
            help=module.HELP,
            description=module.HELP,
            formatter_class=HelpFormatter,
        )
        # Also after the command (`kdsb evaluate … -q`, found by a user's check); left out,
        # they keep the value given before it.
        _add_verbosity(sub, default=argparse.SUPPRESS)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run, memory_advice=_memory_advice(sub),
                         resume_advice=_resume_advice(sub))
    return parser


def _add_verbosity(parser: argparse.ArgumentParser, default: object) -> None:
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", default=default,
                           help="log debug messages")
    verbosity.add_argument("-q", "--quiet", action="store_true", default=default,
                           help="log warnings only")


def _configure_logging(verbose: bool, quiet: bool) -> None:
    """Set this call's verbosity; every call sets it anew (found in review: a `-v` call left a
    later call in the same process at DEBUG, with TensorFlow's C++ logs on)."""
    from kdsb._tf_startup import quiet_tensorflow_start_up, show_tensorflow_logs

    if verbose:
        show_tensorflow_logs()
    else:
        quiet_tensorflow_start_up()
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)  # basicConfig sets it only once a process
    for library in QUIET_LIBRARIES:  # -v is for kdsb's and TensorFlow's debug lines
        logging.getLogger(library).setLevel(max(level, logging.INFO))
    # TensorFlow's Python logger narrates its collectives ("Collective all_reduce …") at INFO.
    tensorflow = logging.getLogger("tensorflow")
    tensorflow.setLevel(logging.DEBUG if verbose else logging.WARNING)
    if verbose:
        tensorflow.removeFilter(_not_retracing)
    else:
        tensorflow.addFilter(_not_retracing)  # once: a filter already there is not added again


def _not_retracing(record: logging.LogRecord) -> bool:
    """Drop TensorFlow's retracing warning: volumes differ in shape, so the first training steps
    retrace until Keras's functions (reduce_retracing) relax their shapes; expected, and not the
    user's to fix."""
    return RETRACING_MESSAGE not in record.getMessage()


def main(argv: list[str] | None = None) -> int:
    """Run the `kdsb` command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose and args.quiet:  # one before the command, the other after it
        parser.error("argument -q/--quiet: not allowed with argument -v/--verbose")
    _configure_logging(args.verbose, args.quiet)
    interrupts.describe(f"kdsb {args.command}", args.resume_advice)
    datasets = sys.modules.get("kdsb.data.datasets")
    if datasets is not None:  # one process, several commands (tests, the demo)
        datasets.forget_pipeline_errors()
    try:
        code = int(args.run(args))
        sys.stdout.flush()  # a reader gone from a pipe shows here, not at the interpreter's exit
        return code
    except UsageError as error:
        print(f"kdsb {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KdsbError as error:
        print(f"kdsb {args.command}: error: {error}", file=sys.stderr)
        return EXIT_DATA_ERROR
    except KeyboardInterrupt:
        print(f"kdsb {args.command}: interrupted; {args.resume_advice}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as error:  # a full or read-only disk, a file gone mid-run: one line too
        if isinstance(error, BrokenPipeError) and _stdout_reader_gone():
            return _reader_gone()
        print(f"kdsb {args.command}: error: {error}", file=sys.stderr)
        return EXIT_DATA_ERROR
    except Exception as error:
        if is_out_of_memory(error):  # not the data's fault, nor a bug: say what to change
            print(f"kdsb {args.command}: error: out of memory ({type(error).__name__}: "
                  f"{out_of_memory_line(error)}): {args.memory_advice}", file=sys.stderr)
            return EXIT_DATA_ERROR
        # TensorFlow's error for a reader that failed inside a tf.data pipeline carries the
        # reader's traceback; the reader's own error (a damaged volume file) says it in a line.
        datasets = sys.modules.get("kdsb.data.datasets")
        found = datasets.pipeline_error(error) if datasets is not None else None
        if found is None:
            raise
        print(f"kdsb {args.command}: error: {found}", file=sys.stderr)
        return EXIT_DATA_ERROR


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has left (a broken pipe elsewhere, a worker's or a
    FIFO's, is an error to report); where that cannot be told, it is taken to be."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), or no stdout
        return True


def _reader_gone() -> int:
    """The reader of stdout left (`kdsb evaluate … | head`): stop without a word, as `cat` does
    (found by a user's trial: "error: [Errno 32] Broken pipe", exit 1, "the data's fault").
    Stdout is pointed at /dev/null, so the flush at exit raises nothing again."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_READER_GONE


def _resume_advice(command: argparse.ArgumentParser) -> str:
    """What to do after an interruption (found by a user's check: "interrupted" alone said
    neither what was kept nor how to go on): a training command's `--resume`, else a rerun."""
    dests = {action.dest for action in command._actions}  # noqa: SLF001 (no public list)
    how = "rerun it with --resume" if "resume" in dests else "rerun the same command"
    return f"what it wrote is whole: {how} to go on where it stopped"


def _memory_advice(command: argparse.ArgumentParser) -> str:
    """What to change after running out of memory: the command's own `MEMORY_OPTIONS`."""
    dests = {action.dest for action in command._actions}  # noqa: SLF001 (no public list)
    options = [text for dest, text in MEMORY_OPTIONS if dest in dests]
    return (f"try {', '.join(options)} or " if options else "try ") + "a machine with more memory"


def entry(argv: list[str] | None = None) -> None:
    """The `kdsb` console command: `main(argv)`, then exit with its status.

    Once TensorFlow has run, an interrupted or failed run leaves by `os._exit`, without the
    interpreter's clean-up: a tf.data iterator destroyed at exit while its Python readers are in
    flight waits for them, and they wait for the interpreter lock the exiting thread holds, so
    such a run hung after printing its message (Ctrl-C in `train-gmcae`). Every file kdsb writes
    is whole or absent by then (atomic writes; Keras's TensorBoard writer flushes each epoch's
    events as it ends: a `train-gmcae` interrupted in epoch 2 keeps epoch 1's), so the clean-up
    has nothing of ours to do. Ctrl-C and SIGTERM are taken as `kdsb.interrupts` says.
    """
    try:
        interrupts.interrupt_on_sigterm()
        interrupts.stop_at_second_ctrl_c()
        code = main(argv)
    except SystemExit as done:  # argparse: --help, or a usage error it has printed
        code = done.code if isinstance(done.code, int) else int(done.code is not None)
    except KeyboardInterrupt:  # a second Ctrl-C while the first was reported
        code = EXIT_INTERRUPTED
    except BaseException:  # a bug: its traceback, as Python would print it
        traceback.print_exc()
        code = 1
    try:
        sys.stdout.flush()
    except OSError:  # a reader gone from a pipe after a failure: nothing more to show it
        _reader_gone()
    if code != 0 and "tensorflow" in sys.modules:
        with contextlib.suppress(OSError):
            sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)
