"""The `kdsb` command: dispatch, version, help without TensorFlow, exit codes."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest

from kdsb import __version__
from kdsb.cli import SUBCOMMANDS, main


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"kdsb {__version__}"


def test_help_lists_every_subcommand_without_importing_tensorflow():
    code = (
        "import sys\n"
        "from kdsb.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0\n"
        "for name in ('tensorflow', 'keras', 'scipy'):\n"
        "    assert name not in sys.modules, name + ' imported by --help'\n"
    )
    result = _run("-c", code)
    assert result.returncode == 0, result.stderr
    for name in SUBCOMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_help_states_each_default_once(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    # One block per option: its flags at two spaces' indent, then its help.
    blocks = [" ".join(block.split()) for block in re.split(r"\n  (?=-)", out)[1:]]
    assert blocks
    for block in blocks:
        assert "(default: None)" not in block and "(default: False)" not in block, block
        # A default the help states itself ("default 128", "default: all") gets no second one.
        assert len(re.findall(r"\(default[: ]|; default |the default", block)) <= 1, block


def test_python_dash_m_is_the_same_command():
    result = _run("-m", "kdsb", "--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"kdsb {__version__}"


def _with_reader_gone(*args: str, cwd) -> subprocess.CompletedProcess:
    """`python ARGS` whose stdout's reader has left before it writes (`… | head -0`)."""
    # Buffered stdout, as for a user (found in review: with PYTHONUNBUFFERED unset the broken
    # pipe showed only at the interpreter's exit, 120 and "Exception ignored").
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    process = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, cwd=cwd, env=env)
    process.stdout.close()
    _, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(args, process.returncode, "", stderr.decode())


def test_a_reader_gone_ends_the_command_without_a_word(tmp_path):
    """Found by a user's trial: `kdsb evaluate … | head` said "error: [Errno 32] Broken pipe"
    with exit 1, the data's fault."""
    (tmp_path / "p.csv").write_text("id,cancer\na,0.2\nb,0.7\nc,0.4\nd,0.9\n")
    (tmp_path / "l.csv").write_text("id,cancer\na,0\nb,1\nc,0\nd,1\n")
    result = _with_reader_gone("-m", "kdsb", "evaluate", "p.csv", "l.csv", "--bootstrap", "0",
                               cwd=tmp_path)
    assert (result.returncode, result.stderr) == (141, "")


def test_a_broken_pipe_that_is_not_stdouts_is_an_error_said(monkeypatch, capsys):
    """Found in review: every broken pipe (a worker's, a FIFO's) would have ended silently."""
    from kdsb import cli
    from kdsb.commands import evaluate

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(evaluate, "run", broken)
    monkeypatch.setattr(cli, "_stdout_reader_gone", lambda: False)
    assert main(["evaluate", "p.csv", "l.csv"]) == 1
    assert "kdsb evaluate: error: [Errno 32] Broken pipe" in capsys.readouterr().err


def test_unknown_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_missing_dicom_root_is_a_usage_error(tmp_path, capsys):
    assert main(["preprocess", str(tmp_path / "absent"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "absent" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_synth_and_preprocess_run_without_importing_tensorflow(tmp_path):
    """The CPU-only stages never load TensorFlow or Keras (slow imports, GPU memory grabbed)."""
    code = (
        "import sys\n"
        "from kdsb.cli import main\n"
        f"root, out = {str(tmp_path / 'cohort')!r}, {str(tmp_path / 'out')!r}\n"
        "assert main(['--quiet', 'synth', root, '--patients', '1', '--seed', '0',\n"
        "             '--size', '64', '--scale', '0.7']) == 0\n"
        "assert main(['--quiet', 'preprocess', root + '/dicom', out, '--spacing', '3',\n"
        "             '--qc', out + '/qc']) == 0\n"
        "for name in ('tensorflow', 'keras'):\n"
        "    assert name not in sys.modules, name + ' imported by synth or preprocess'\n"
    )
    result = _run("-c", code)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "phantom_000.h5").is_file()


def test_the_evaluate_commands_bootstrap_default_is_the_metrics_one():
    from kdsb.commands import evaluate as command
    from kdsb.evaluation import metrics

    assert command.DEFAULT_BOOTSTRAP == metrics.DEFAULT_BOOTSTRAP


def test_the_keras_hook_lists_every_module_of_registered_objects():
    """A module of `register_keras_serializable` objects left out of the hook's list loads
    with its own import only: `keras.saving.load_model` of a model holding them fails after a
    plain `import kdsb` (the contract of saved models)."""
    from pathlib import Path

    import kdsb
    from kdsb._keras_hook import KERAS_OBJECT_MODULES

    root = Path(kdsb.__file__).parent
    registering = {
        "kdsb." + ".".join(path.relative_to(root).with_suffix("").parts)
        for path in root.rglob("*.py")
        if re.search(r"^@keras\.saving\.register_keras_serializable", path.read_text(), re.M)
    }
    assert registering == set(KERAS_OBJECT_MODULES)


@pytest.mark.parametrize("first", ["keras", "tensorflow"])
def test_kdsbs_keras_objects_are_registered_whichever_imports_keras(first):
    """Found in review: TensorFlow's import looks `keras` up (`importlib.util.find_spec`)
    before importing it, and the one-shot hook left on that look: `import kdsb, tensorflow,
    keras` left kdsb's layers unregistered, and `keras.saving.load_model` failed on them."""
    code = (f"import sys, kdsb, {first}, keras; "
            "from keras.saving import get_registered_object as get; "
            "assert get('kdsb>ShiftedELU') is not None, 'not registered'; "
            "assert not any(type(f).__name__ == '_OneShotFinder' for f in sys.meta_path)")
    subprocess.run([sys.executable, "-c", code], check=True, env={
        **os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


def test_the_one_shot_finder_neither_recurses_nor_is_lost_to_a_failed_import(tmp_path,
                                                                             monkeypatch):
    """Found in review: two such finders for one module looked it up through each other for
    ever, and one removed before a failed import (TensorFlow swallows its import of keras)
    was gone for the import that followed."""
    import importlib
    import importlib.abc

    from kdsb import _keras_hook as hook

    name = "kdsb_probe_module"
    flag = tmp_path / "fail"
    (tmp_path / f"{name}.py").write_text(
        f"import os\nif os.path.exists({str(flag)!r}):\n    raise ImportError('not yet')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    executed = []

    class Counting(importlib.abc.Loader):
        def __init__(self, loader):
            self.loader = loader

        def create_module(self, spec):
            return self.loader.create_module(spec)

        def exec_module(self, module):
            self.loader.exec_module(module)
            executed.append(module.__name__)

    def ours():
        return [f for f in sys.meta_path if isinstance(f, hook._OneShotFinder)
                and f.fullname == name]

    flag.write_text("")
    hook.wrap_first_import(name, Counting)
    with pytest.raises(ImportError, match="not yet"):
        importlib.import_module(name)
    assert len(ours()) == 1 and not executed  # still there for the next try
    sys.meta_path.insert(0, hook._OneShotFinder(name, Counting))  # a second copy
    flag.unlink()
    importlib.import_module(name)
    assert executed and not ours()
    monkeypatch.delitem(sys.modules, name)


def test_no_module_of_keras_objects_imports_names_from_another_at_import_time():
    """Whichever of them first imports Keras, the hook then imports the others while that one
    is half initialised: a name imported from it at module level may not exist yet (found in
    review: ensemble took EPSILON from calibration, and `import kdsb.models.calibration` failed
    in a fresh process). Names are taken inside functions instead; whole modules are fine."""
    import ast
    import importlib.util

    from kdsb._keras_hook import KERAS_OBJECT_MODULES

    for module in KERAS_OBJECT_MODULES:
        with open(importlib.util.find_spec(module).origin, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module in KERAS_OBJECT_MODULES:
                raise AssertionError(f"{module} imports {[a.name for a in node.names]} from "
                                     f"{node.module} at import time")


def test_importing_kdsb_quiets_tensorflow_start_up_lines():
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    code = "import kdsb.models.losses, tensorflow as tf\nprint(int(tf.constant(1) + 1))\n"
    verbose = "from kdsb.cli import _configure_logging\n_configure_logging(True, False)\n"
    cases = {
        "quiet": (code, env),
        # `kdsb -v` lets TensorFlow's info lines through again (so does the user's own level:
        # the rule is tested without starting TensorFlow below).
        "verbose": (verbose + code, env),
    }
    # Side by side: each start of TensorFlow costs seconds.
    processes = {name: subprocess.Popen([sys.executable, "-c", source], env=case_env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
                 for name, (source, case_env) in cases.items()}
    results = {}
    try:
        for name, process in processes.items():
            results[name] = process.communicate(timeout=120)
            assert process.returncode == 0, f"{name}: {results[name][1]}"
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    out, err = results["quiet"]
    assert out.strip() == "2"
    for chatter in ("I0000", "oneDNN", "cpu_feature_guard", "absl::InitializeLog"):
        assert chatter not in err
    assert "cpu_feature_guard" in results["verbose"][1] or "oneDNN" in results["verbose"][1]


def test_a_subprocess_inheriting_kdsbs_level_is_quieted_the_same_way(monkeypatch):
    """A child inherits TF_CPP_MIN_LOG_LEVEL and KDSB_TF_LOG_LEVEL as kdsb set them: the level is
    kdsb's, so the child filters TensorFlow's start-up too (and `-v` may lower it); a level the
    user set (unlike kdsb's) is left alone."""
    from kdsb import _tf_startup

    wrapped = []
    monkeypatch.setattr(_tf_startup, "wrap_first_import", lambda *args: wrapped.append(args))
    for level, ours, quieted in (("3", "3", True), ("0", "3", False), ("2", None, False)):
        wrapped.clear()
        monkeypatch.setenv(_tf_startup.LEVEL_VARIABLE, level)
        if ours is None:
            monkeypatch.delenv(_tf_startup.OURS_VARIABLE, raising=False)
        else:
            monkeypatch.setenv(_tf_startup.OURS_VARIABLE, ours)
        _tf_startup.quiet_tensorflow_start_up()
        assert bool(wrapped) == quieted, (level, ours)
        assert os.environ[_tf_startup.LEVEL_VARIABLE] == ("3" if quieted else level)


def test_tensorflow_retracing_warning_is_kept_under_verbose_only(caplog, monkeypatch):
    import kdsb._tf_startup
    from kdsb.cli import _configure_logging

    # -v would also let TensorFlow's C++ lines through for the rest of this process.
    monkeypatch.setattr(kdsb._tf_startup, "show_tensorflow_logs", lambda: None)
    tensorflow = logging.getLogger("tensorflow")
    message = "5 out of the last 13 calls to <function f> triggered tf.function retracing."
    try:
        _configure_logging(False, False)
        _configure_logging(False, False)  # main called twice in a process: one filter
        with caplog.at_level(logging.WARNING, logger="tensorflow"):
            tensorflow.warning(message)
            tensorflow.warning("a real warning")
        assert [r.getMessage() for r in caplog.records] == ["a real warning"]
        caplog.clear()
        _configure_logging(True, False)
        with caplog.at_level(logging.WARNING, logger="tensorflow"):
            tensorflow.warning(message)
        assert [r.getMessage() for r in caplog.records] == [message]
    finally:
        tensorflow.filters.clear()
        tensorflow.setLevel(logging.NOTSET)


def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path,
                                                                            monkeypatch):
    """A read-only file system (or a folder without write permission) is found when the command
    checks its paths, not after scoring every patient (found by a user's check)."""
    import errno
    import tempfile

    from kdsb.errors import UsageError
    from kdsb.io.paths import require_output_dir, require_output_file

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    require_output_file(tmp_path / "p.csv", "OUT_CSV")  # writable: no error
    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    for check, path in ((require_output_file, tmp_path / "p.csv"),
                        (require_output_dir, tmp_path / "out" / "deeper")):
        with pytest.raises(UsageError, match=r"received a path where nothing can be written "
                                             r"\(Read-only file system\)"):
            check(path, "the output")


def test_an_io_error_mid_run_is_one_line_exit_1(monkeypatch, capsys):
    import errno

    import kdsb.commands.evaluate as evaluate_command

    def disk_full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "plots/roc.png")

    monkeypatch.setattr(evaluate_command, "run", disk_full)
    assert main(["evaluate", "p.csv", "l.csv"]) == 1
    err = capsys.readouterr().err
    assert err == "kdsb evaluate: error: [Errno 28] No space left on device: 'plots/roc.png'\n"


def test_running_out_of_memory_is_one_line_saying_what_to_change(monkeypatch, capsys):
    """Found in review: a GPU's ResourceExhaustedError was a traceback."""
    import kdsb.commands.train_classifier as train_command

    class OpError(Exception):
        pass

    class ResourceExhaustedError(OpError):  # TensorFlow's, told by its name
        pass

    for error in (ResourceExhaustedError("Graph execution error:\n\nOOM when allocating "
                                         "tensor with shape[1,64,300]\n\t [[{{node conv}}]]"),
                  MemoryError()):
        monkeypatch.setattr(train_command, "run", lambda args, error=error: (_ for _ in ()).throw(
            error))
        assert main(["train-classifier", "d", "l.csv", "r"]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"kdsb train-classifier: error: out of memory "
                              f"({type(error).__name__}") and err.count("\n") == 1
        assert err.endswith("): try a smaller --batch-size, --tile-z 32 (head spp), "
                            "--downscale 2 or a machine with more memory\n")
        if isinstance(error, ResourceExhaustedError):  # the line saying OOM, not the first
            assert "OOM when allocating tensor" in err


def test_the_memory_advice_names_only_the_failed_commands_options(monkeypatch, capsys):
    import kdsb.commands.predict as predict_command
    import kdsb.commands.train_gmcae as train_gmcae_command

    for module, argv, advice in (
            (predict_command, ["predict", "d", "m.keras", "--out", "p.csv"],
             "try a machine with more memory"),
            (train_gmcae_command, ["train-gmcae", "d", "r"],
             "try a smaller --batch-size, --width, --patch-size or a machine with more memory")):
        monkeypatch.setattr(module, "run", lambda args: (_ for _ in ()).throw(MemoryError()))
        assert main(argv) == 1
        assert capsys.readouterr().err == (f"kdsb {argv[0]}: error: out of memory (MemoryError: "
                                           f"): {advice}\n")


def test_an_interrupted_command_says_how_to_go_on(monkeypatch, capsys):
    """Found by a user's check: "interrupted" alone said neither what was kept nor how to go
    on; a training command resumes with --resume, the others by a rerun."""
    import kdsb.commands.predict as predict_command
    import kdsb.commands.train_classifier as train_classifier_command

    for module, argv, how in (
            (predict_command, ["predict", "d", "m.keras", "--out", "p.csv"],
             "rerun the same command"),
            (train_classifier_command, ["train-classifier", "d", "l.csv", "r"],
             "rerun it with --resume")):
        monkeypatch.setattr(module, "run", lambda args: (_ for _ in ()).throw(KeyboardInterrupt))
        assert main(argv) == 130
        assert capsys.readouterr().err == (f"kdsb {argv[0]}: interrupted; what it wrote is "
                                           f"whole: {how} to go on where it stopped\n")


def test_an_earlier_pipeline_error_never_stands_in_for_another(monkeypatch, tmp_path):
    """A reader's error kept from an earlier command of the same process (tests, the demo) is
    not printed in place of a later, unrelated exception (found in review)."""
    from kdsb.commands import evaluate
    from kdsb.data import datasets
    from kdsb.errors import StoreError

    datasets._pipeline_errors.append(StoreError("p1.h5: expected readable voxels"))

    def broken(args):
        datasets._pipeline_errors.append(StoreError("p2.h5: expected readable voxels"))
        raise ValueError("a bug")

    monkeypatch.setattr(evaluate, "run", broken)
    with pytest.raises(ValueError, match="a bug"):
        main(["evaluate", str(tmp_path / "a.csv"), str(tmp_path / "b.csv")])


def test_each_call_sets_its_own_verbosity(monkeypatch):
    """Found in review: a `-v` call left later calls in the same process (a notebook, a test)
    at DEBUG with TensorFlow's C++ logs on, and `-q` left them at WARNING."""
    from kdsb import _tf_startup, cli

    monkeypatch.delenv(_tf_startup.LEVEL_VARIABLE, raising=False)
    monkeypatch.delenv(_tf_startup.OURS_VARIABLE, raising=False)
    root = logging.getLogger()
    monkeypatch.setattr(root, "level", root.level)
    cli._configure_logging(verbose=True, quiet=False)
    assert root.level == logging.DEBUG and os.environ[_tf_startup.LEVEL_VARIABLE] == "0"
    cli._configure_logging(verbose=False, quiet=True)
    assert root.level == logging.WARNING
    assert os.environ[_tf_startup.LEVEL_VARIABLE] == _tf_startup.QUIET_LEVEL
    cli._configure_logging(verbose=False, quiet=False)
    assert root.level == logging.INFO
    # -v leaves other libraries' debug chatter out (found by a user's check: Matplotlib's
    # findfont lines flooded it).
    for library in cli.QUIET_LIBRARIES:
        monkeypatch.setattr(logging.getLogger(library), "level", logging.getLogger(library).level)
    matplotlib = logging.getLogger("matplotlib")
    cli._configure_logging(verbose=True, quiet=False)
    assert root.level == logging.DEBUG and not matplotlib.isEnabledFor(logging.DEBUG)
    cli._configure_logging(verbose=False, quiet=True)
    assert not matplotlib.isEnabledFor(logging.INFO)


def test_verbosity_flags_work_after_the_command_too(capsys):
    """Found by a user's check: `kdsb evaluate … -q` was "unrecognized arguments: -q"."""
    from kdsb.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["evaluate", "p.csv", "l.csv", "-q"])
    assert args.quiet and not args.verbose
    args = parser.parse_args(["-v", "evaluate", "p.csv", "l.csv"])
    assert args.verbose and not args.quiet
    with pytest.raises(SystemExit) as exit_info:
        main(["-v", "evaluate", "p.csv", "l.csv", "-q"])
    assert exit_info.value.code == 2
    assert "not allowed with argument -v/--verbose" in capsys.readouterr().err


# A command whose main thread is deep in a C call that neither checks for signals nor returns for
# minutes (as TensorFlow's training step or wait for a batch does), the GIL released. "ready" is
# printed by a thread once the main thread is in there; "c-full-stderr" also fills stderr, a pipe
# the test reads only at the end, as a pager nobody scrolls would.
STUCK_IN_C = """
import hashlib, os, signal, sys, threading, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal's command gets it
from kdsb import interrupts
interrupts.interrupt_on_sigterm()
assert interrupts.stop_at_second_ctrl_c()
interrupts.describe("kdsb test", "what it wrote is whole: rerun the same command")
interrupts.at_forced_stop(lambda: print("cleaned up", flush=True))

def announce():
    time.sleep(0.3)
    print("ready", flush=True)
    if sys.argv[1] == "c-full-stderr":
        while True:
            os.write(2, b"x" * 4096)

threading.Thread(target=announce, daemon=True).start()
try:
    if sys.argv[1].startswith("c"):
        hashlib.pbkdf2_hmac("sha256", b"key", b"salt", 10**9)
    while True:
        time.sleep(0.01)
except KeyboardInterrupt:
    print("taken", flush=True)
    try:
        time.sleep(5)  # stopping: its clean-up
    except KeyboardInterrupt:
        print("taken again", flush=True)
        sys.exit(7)
"""


def _interrupted(where: str, pause_s: float) -> tuple[int, str, str, bool]:
    """Run STUCK_IN_C (`where`: "c", "c-full-stderr" or "python"), Ctrl-C, wait `pause_s`,
    Ctrl-C again: its exit status, stdout, stderr, and whether it was still running before the
    second."""
    import signal
    import time

    process = subprocess.Popen([sys.executable, "-c", STUCK_IN_C, where], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert process.stdout.readline() == "ready\n"
        process.send_signal(signal.SIGINT)
        time.sleep(pause_s)
        running = process.poll() is None
        process.send_signal(signal.SIGINT)
        process.wait(timeout=20)  # stderr unread until it ended
        out, err = process.communicate()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, "ready\n" + out, err, running


@pytest.mark.parametrize("where", ["c", "c-full-stderr"])
def test_a_second_ctrl_c_stops_a_command_stuck_in_a_long_computation_at_once(where):
    """Ctrl-C waits for the main thread to run Python again (found while mending a flaky
    test: a training run whose reader stalled never took it); the second one stops the
    process at once, exit 130, after the registered clean-ups, saying so and how to go on;
    also when stderr is a full pipe (found in review: the line's write blocked the exit)."""
    code, out, err, running = _interrupted(where, pause_s=1.0)
    assert running, "the first Ctrl-C should wait for the computation"
    assert code == 130
    assert out.splitlines() == ["ready", "cleaned up"]
    if where == "c":
        assert err.strip().splitlines()[-1] == (
            "kdsb test: interrupted again before it could stop: stopped at once; what it wrote "
            "is whole: rerun the same command")


def test_a_second_ctrl_c_after_the_first_was_taken_is_pythons():
    """A command already stopping (its clean-up under way) gets the second Ctrl-C as a
    KeyboardInterrupt, as before: no forced stop."""
    code, out, err, _ = _interrupted("python", pause_s=0.5)
    assert code == 7
    assert out.splitlines() == ["ready", "taken", "taken again"]
    assert "stopped at once" not in err


def test_ctrl_c_ignored_by_the_shell_stays_ignored():
    """A job started in the background of a shell without job control has Ctrl-C ignored:
    kdsb leaves it so (no handler of its own)."""
    script = ("import signal\n"
              "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
              "from kdsb import interrupts\n"
              "print(interrupts.stop_at_second_ctrl_c(), "
              "signal.getsignal(signal.SIGINT) is signal.SIG_IGN)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True)
    assert done.stdout.split() == ["False", "True"]
