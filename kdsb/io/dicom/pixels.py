"""Decoding the chosen series' pixels into int16 HU: rescale, padding and outside-field values
to air, native 16-bit images read straight from their bytes, a clear error for a missing
decoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixels import get_decoder
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from kdsb.errors import MissingDecoderError
from kdsb.hu import AIR_HU, OUTSIDE_FIELD_HU
from kdsb.io.dicom.files import patient_error, read_dataset
from kdsb.io.dicom.headers import Header, padding_range, rescale_of
from kdsb.io.series import INT16_MAX, INT16_MIN

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
# Native (uncompressed) little-endian 16-bit images are read straight from their bytes.
NATIVE_SYNTAXES = (ImplicitVRLittleEndian, ExplicitVRLittleEndian)
NATIVE_BITS = 16
# Transfer syntax UID prefixes → the pylibjpeg plugin that decodes them.
DECODER_PACKAGES = {
    "1.2.840.10008.1.2.4.5": "pylibjpeg-libjpeg",  # JPEG baseline/extended (.50, .51)
    "1.2.840.10008.1.2.4.57": "pylibjpeg-libjpeg",  # JPEG lossless
    "1.2.840.10008.1.2.4.70": "pylibjpeg-libjpeg",  # JPEG lossless, first-order prediction
    "1.2.840.10008.1.2.4.8": "pylibjpeg-libjpeg",  # JPEG-LS (.80, .81)
    "1.2.840.10008.1.2.4.9": "pylibjpeg-openjpeg",  # JPEG 2000 (.90, .91)
    "1.2.840.10008.1.2.4.20": "pylibjpeg-openjpeg",  # High-Throughput JPEG 2000 (.201-.203)
    "1.2.840.10008.1.2.5": "pylibjpeg-rle",  # RLE lossless
}


def _check_decoder(patient: str, header: Header) -> None:
    path, syntax = header.path, header.transfer_syntax
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise patient_error(
            patient,
            f"expected a supported transfer syntax, received {syntax}", path
        ) from exc
    if not decoder.is_available:
        package = next(
            (pkg for prefix, pkg in DECODER_PACKAGES.items() if syntax.startswith(prefix)),
            "pylibjpeg with its plugins",
        )
        raise MissingDecoderError(
            f"patient {patient}: expected an installed decoder for transfer syntax "
            f"{syntax}, received none: install {package} (file {path.name})"
        )


def _read_slice(
    patient: str, header: Header, out: np.ndarray, frames: dict[Path, list]
) -> int:
    """Decode one file once and write its HU (int16) into `out` (rows, columns); returns the
    voxels that were padding or outside the field (`_store_hu`).

    Releases the header's kept dataset (its bytes and the decoded array pydicom caches). The
    frames of an Enhanced CT file are decoded together once and kept in `frames` (path →
    [decoded frames, frames still to read]) until the last of them is read.
    """
    path = header.path
    ds, header.dataset = header.dataset, None
    if header.frame is not None and frames[path][0] is not None:
        decoded = frames[path][0]
        frames[path][1] -= 1
        if not frames[path][1]:
            frames[path][0] = None
        return _store_hu(decoded[header.frame], header.rescale or (1.0, 0.0), header.padding,
                         out)
    if ds is None:
        try:
            ds = read_dataset(path)
        except Exception as exc:  # pydicom raises many types for truncated or corrupt files
            raise patient_error(
                patient,
                f"expected a readable DICOM file, received {exc}", path
            ) from exc
    if "PixelData" not in ds:
        raise patient_error(patient, "expected pixel data, received a file without PixelData", path)
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in MONOCHROME or int(ds.get("SamplesPerPixel", 1)) != 1:
        raise patient_error(
            patient,
            f"expected a MONOCHROME1/2 single-sample image, received {photometric}", path
        )
    try:
        stored = _native_pixels(ds)
        if stored is None:
            stored = ds.pixel_array
    except Exception as exc:  # decoders raise many types for truncated or corrupt data
        raise patient_error(
            patient,
            f"expected decodable pixel data, received truncated or corrupt data ({exc})", path
        ) from exc
    if header.frame is not None:
        frames[path][0] = stored.reshape((-1, *stored.shape[-2:]))  # one frame decodes to 2D
        return _read_slice(patient, header, out, frames)
    if stored.shape != out.shape:
        raise patient_error(
            patient,
            f"expected a {out.shape[0]}×{out.shape[1]} image, received {stored.shape}", path
        )
    return _store_hu(stored, rescale_of(patient, ds, path), padding_range(patient, ds, path),
                     out)


def _native_pixels(ds: pydicom.Dataset) -> np.ndarray | None:
    """The stored values of a native little-endian 16-bit single-frame image, read straight
    from its bytes; None for any other encoding (pydicom decodes those).

    The same values as `ds.pixel_array` (unused high bits cleared, or sign-extended, as pydicom
    does), without its per-call decoder set-up: 0.4 of the 0.8 ms a 512×512 slice took.
    """
    if (
        str(ds.file_meta.get("TransferSyntaxUID", "")) not in NATIVE_SYNTAXES
        or "PixelData" not in ds
        or int(ds.get("BitsAllocated", 0)) != NATIVE_BITS
        or not 0 < int(ds.get("BitsStored", 0)) <= NATIVE_BITS
        or int(ds.get("SamplesPerPixel", 1)) != 1
        or int(ds.get("NumberOfFrames", 1) or 1) != 1
    ):
        return None
    rows, columns = int(ds.Rows), int(ds.Columns)
    data = ds.PixelData
    if len(data) < rows * columns * NATIVE_BITS // 8:
        return None  # pydicom says what is wrong
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    stored = np.frombuffer(data, dtype="<i2" if signed else "<u2", count=rows * columns)
    unused = NATIVE_BITS - int(ds.BitsStored)
    if unused:
        stored = np.right_shift(np.left_shift(stored, unused), unused)
    return stored.reshape(rows, columns)


def _store_hu(
    stored: np.ndarray,
    rescale: tuple[float, float],
    padding: tuple[int, int] | None,
    out: np.ndarray,
) -> int:
    """Stored pixel values → int16 HU in `out`: rescale, outside-field and padding → air;
    returns how many voxels were padding or outside the field (no air of the scan's own).

    Args:
        stored: the decoded pixel values (rows, columns).
        rescale: (slope, intercept).
        padding: the stored values (low, high) that are padding (`padding_range`), or None.
        out: (rows, columns) int16 destination.
    """
    slope, intercept = rescale
    integer = slope == 1.0 and intercept.is_integer()
    if (integer and stored.dtype.itemsize <= 2
            and INT16_MIN <= int(stored.min()) + int(intercept)
            and int(stored.max()) + int(intercept) <= INT16_MAX):
        # The usual case: HU fit int16 throughout, so they go straight into `out`.
        np.add(stored, np.int32(intercept), out=out, casting="unsafe")
        hu = out
    elif integer:
        hu = stored.astype(np.int32) + int(intercept)
    else:
        hu = stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)
        np.rint(hu, out=hu)
    air = hu <= OUTSIDE_FIELD_HU
    if padding is not None:
        air |= (stored >= padding[0]) & (stored <= padding[1])
    hu[air] = AIR_HU
    padded = int(np.count_nonzero(air))
    if hu is not out:
        if hu.min() < INT16_MIN or hu.max() > INT16_MAX:  # rare; two reductions beat a clip
            np.clip(hu, INT16_MIN, INT16_MAX, out=hu)
        out[...] = hu
    return padded


def read_pixels(patient: str, headers: list[Header]) -> tuple[np.ndarray, int]:
    """The slices decoded into one int16 HU array (slice, row, column), in the given order,
    and how many of its voxels were padding or outside the field (now `AIR_HU`)."""
    # Each transfer syntax of the series (found in review: a series mixing syntaxes, checked
    # on its first file alone, failed later as "truncated or corrupt data").
    checked = set()
    for header in headers:
        if header.transfer_syntax not in checked:
            checked.add(header.transfer_syntax)
            _check_decoder(patient, header)
    volume = np.empty((len(headers), headers[0].rows, headers[0].columns), dtype=np.int16)
    frames: dict[Path, list] = {}
    for header in headers:
        if header.frame is not None:
            frames.setdefault(header.path, [None, 0])[1] += 1
    padded = sum(_read_slice(patient, header, volume[index], frames)
                 for index, header in enumerate(headers))
    return volume, padded

