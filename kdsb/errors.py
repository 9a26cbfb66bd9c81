"""The errors kdsb raises for bad input.

Every error is a `KdsbError` (a `ValueError`), worded "expected …, received …" and naming the
file or patient it concerns, so the command line can print it on one line without a traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class KdsbError(ValueError):
    """Base class of every error caused by the user's data, files or options."""


class DicomError(KdsbError):
    """A DICOM file or series cannot be read or does not form a usable CT volume."""


class MissingDecoderError(DicomError):
    """Pixel data is compressed with a transfer syntax whose decoder is not installed."""


class VolumeFileError(KdsbError):
    """A NIfTI, MetaImage or NRRD file cannot be read or does not hold a usable CT volume in HU."""


class LungMaskError(KdsbError):
    """No plausible lung mask could be found in a volume."""


class StoreError(KdsbError):
    """A kdsb HDF5 volume file is missing, unreadable or not in the kdsb format."""


class LabelsError(KdsbError):
    """A labels or ids CSV is malformed or disagrees with the volumes on disk."""


class ModelError(KdsbError):
    """A model file or model option is not what kdsb expects (a .keras file that is no GMCAE)."""


class TrainingError(KdsbError):
    """Training cannot go on (for example the loss became NaN); the message says why."""


class UsageError(KdsbError):
    """The command line itself is wrong (a missing folder, incompatible options): exit status 2."""


class WrongModelError(ModelError, UsageError):
    """A model file of another kind than the command needs (a GMCAE where a classifier goes):
    the command line names the wrong file, so exit status 2, as for a folder holding none."""


def one_line(text: object) -> str:
    """`text` (an error, a message) on one line: every run of whitespace, newlines included, as
    one space (the messages of decoders, HDF5 and Dask span lines)."""
    return " ".join(str(text).split())


def first_line(error: BaseException | None) -> str:
    """An error's first line, whitespace collapsed (its type's name when it says nothing):
    Keras's and TensorFlow's messages run on for lines."""
    text = str(error).splitlines()[0] if error is not None and str(error) else ""
    return one_line(text) or type(error).__name__


def is_out_of_memory(error: BaseException) -> bool:
    """A MemoryError, or TensorFlow's ResourceExhaustedError (a GPU's memory spent), told by
    its name: importing TensorFlow to test it would cost seconds in commands without it."""
    return isinstance(error, MemoryError) or any(
        cls.__name__ == "ResourceExhaustedError" for cls in type(error).__mro__)


@contextmanager
def naming_on_out_of_memory(what: str) -> Iterator[None]:
    """Running out of memory inside the block is raised again as a MemoryError naming `what`
    (a patient's volume file): found in review, one large scan that exhausted a GPU stopped a
    cohort's run without a word of which it was."""
    try:
        yield
    except Exception as error:
        if not is_out_of_memory(error) or str(error).startswith(f"{what}: "):
            raise
        raise MemoryError(f"{what}: {out_of_memory_line(error) or 'out of memory'}") from error


def out_of_memory_line(error: BaseException) -> str:
    """The line of an out-of-memory error that says so (Keras's fit raises "Graph execution
    error:" first), whitespace collapsed, at most 200 characters."""
    lines = [line for line in str(error).splitlines() if line.strip()] or [""]
    found = next((line for line in lines if "OOM" in line or "memory" in line), lines[0])
    return one_line(found)[:200]
