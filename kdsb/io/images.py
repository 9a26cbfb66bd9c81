"""Read one volume file (NIfTI, MetaImage, NRRD) into a canonical CT volume in Hounsfield units.

`read_image(path)` returns the same `CTSeries` as `kdsb.io.dicom.read_series`: int16 HU, shape
(z, y, x), axis 0 inferior → superior, axis 1 anterior → posterior, axis 2 right → left (DICOM /
LPS patient coordinates Z, Y, X increasing along the axes), spacing and origin in mm in
(z, y, x) order. Its `series_uid` is `"file:<file name>"` (for example
`"file:1.3.6.1.4.1.14519.5.2.1.6279.6001.100225287222365663678666836860.mhd"`): volume files
carry no SeriesInstanceUID, and the name is what identifies the scan in such a cohort (LUNA16
names its files by the series UID).

Formats, by file name (case-insensitive): NIfTI (`.nii`, `.nii.gz`), MetaImage (`.mhd` header
with its data file, usually `.raw`, or the single-file `.mha`: the LUNA16 layout) and NRRD
(`.nrrd`, or the detached `.nhdr` header with its data file). They are read with SimpleITK: one
well-kept reader for all three formats that returns every image in LPS patient coordinates with
its spacing, origin and direction matrix (the NIfTI sform/qform already converted from RAS), so
one geometry path serves them all; nibabel would read NIfTI only, in RAS.

How the volume is checked and made canonical:

- The file must be a 3D image of one value per voxel (a 2D, 4D or vector image is an error;
  SimpleITK reads a NIfTI file's 4th axis of length 1 as none, so that one is 3D)
  with at least `MIN_SLICES` voxels along every axis. A `.mhd` whose data file is missing is an
  error naming both files, found before SimpleITK tries anything. A NIfTI file shorter than its
  header promises is an error too: SimpleITK would fill the missing voxels with 0 HU unasked.
  What SimpleITK's MetaImage and NIfTI libraries print to stderr is caught and folded into the
  one-line message (or one warning line when the read succeeds) instead of reaching the screen.
- Geometry comes from the direction matrix: each image axis must run along a patient axis
  (within `kdsb.io.series.AXIS_ALIGNMENT_TOLERANCE`, as for DICOM); axis-aligned images of any
  permutation and flip are transposed and flipped into the canonical order, the origin moved to
  the new voxel [0, 0, 0]. Oblique directions are an error. NIfTI's float32 spacing and
  origin are read as the decimals they stand for (`shortest_float32`: 0.699999988 → 0.7 mm),
  but for origins whose float32 happens to be a whole multiple of 1/4096 mm, which stay it
  (found in review: -354.9441 mm read as -354.944091796875; under 0.0001 mm off).
  An orientation the file does not state is an error: a NIfTI file with neither sform nor
  qform coded, an NRRD file without `space:` (SimpleITK reads both as identity directions at
  origin 0); so is a NIfTI file whose pixdim disagrees with its coded sform or qform
  (SimpleITK mixes the two: spacing from pixdim, directions and origin from the transform).
- Values are taken as HU as stored (NIfTI's scl_slope / scl_inter are applied by the reader;
  MetaImage and NRRD have no rescale). A volume with under `hu.MIN_AIR_SHARE` (1 %) of its
  voxels at or below `hu.MAX_AIR_HU` is plainly not HU (a CT holds air and lung far below it;
  MR, PET, unsigned storage without its intercept, whose only dark voxels may be a border of
  padding, or a normalised image do not) and is an error, as are NaN or infinite values (in a
  floating-point NIfTI file found by nibabel: SimpleITK reads them as 0).
  Float values are rounded to the nearest HU; anything at or below `OUTSIDE_FIELD_HU` (the
  -2000 / -3024 HU outside-field values) becomes air, -1000 HU; the result is clipped into
  int16.

Every problem raises a one-line `VolumeFileError` naming the patient and the file, never a
SimpleITK traceback.
"""

from __future__ import annotations

import gzip
import logging
import re
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from kdsb.errors import VolumeFileError
from kdsb.hu import AIR_HU, OUTSIDE_FIELD_HU, air_share, not_hounsfield
from kdsb.io.native_stderr import NativeStderr
from kdsb.io.series import (
    INT16_MAX,
    INT16_MIN,
    LPS_TO_RAS,
    MIN_SLICES,
    MM_DECIMALS,
    CTSeries,
    patient_axis,
)
from kdsb.io.volume_files import (
    METAIMAGE_HEADER_SUFFIX,
    VOLUME_FORMATS,
    metaimage_data_file,
    volume_id,
    volume_suffix,
)

if TYPE_CHECKING:
    import SimpleITK as sitk

logger = logging.getLogger(__name__)

SERIES_UID_PREFIX = "file:"
IMAGE_DIMENSION = 3
SCALAR_PIXEL_TYPES = ("sitkInt8", "sitkUInt8", "sitkInt16", "sitkUInt16", "sitkInt32",
                      "sitkUInt32", "sitkInt64", "sitkUInt64", "sitkFloat32", "sitkFloat64")
IMAGE_AXES = "ijk"  # names of the file's index axes in messages (i fastest, as ITK counts)
# A float32 spacing or origin that is a whole number of 1/4096 mm is kept as it is.
BINARY_FRACTION_SCALE = 4096
NIFTI_GZIP_SUFFIX = ".nii.gz"
NIFTI2_HEADER_BYTES = 540  # a NIfTI-2 file's sizeof_hdr (NIfTI-1: 348)
NIFTI_HEADER_SIZES = (348, NIFTI2_HEADER_BYTES)
NIFTI_SUFFIXES = (".nii", NIFTI_GZIP_SUFFIX)
NRRD_SUFFIXES = (".nrrd", ".nhdr")
NRRD_SPACE_KEY = "NRRD_space"  # SimpleITK's key for the NRRD header's `space:` field
# The anatomical spaces of the NRRD format (RAS, LAS, LPS and their long names; ITK reports
# those it turned into LPS as left-posterior-superior).
NRRD_PATIENT_SPACES = ("left-posterior-superior", "right-anterior-superior",
                       "left-anterior-superior")
# How far (mm, and mm per voxel step) SimpleITK's reading of a NIfTI geometry may lie from the
# header's coded qform or sform: float32 rounding is ~1e-5 mm.
NIFTI_GEOMETRY_TOLERANCE_MM = 1e-3
GZIP_CHUNK_BYTES = 16 * 1024**2  # read size when measuring a .nii.gz's decompressed length
BITS_PER_BYTE = 8
_T = TypeVar("_T")
# "…ITK ERROR: MetaImageIO(0x55…): File cannot be read…" or "…sitk::ERROR: Unable to…":
# the reason without SimpleITK's source location and object address.
_ITK_REASON = re.compile(r"ERROR:\s*(?:\w+\(0x[0-9a-fA-F]+\):\s*)?(?P<reason>.*)", re.DOTALL)
# ITK's "… Reason: <strerror(errno)>": errno left over from an earlier call ("Inappropriate
# ioctl for device"), dropped when the format's library printed the real reason.
_STALE_ERRNO = re.compile(r"\s*Reason: [^(]*$")
# MetaIO's complaint of a data file shorter than its header promises, in bytes.
_METAIMAGE_SHORT = re.compile(r"data not read completely ideal = (\d+) : actual = (\d+)")
GZIP_MAGIC = b"\x1f\x8b"


def _rounded(values: np.ndarray) -> list[float]:
    """Values for a message, to 0.0001 mm."""
    return np.round(np.asarray(values, dtype=np.float64), 4).tolist()


class _Reader:
    """Reads one volume file; holds the patient and file for the error messages."""

    def __init__(self, path: Path, patient: str) -> None:
        self.path = path
        self.patient = patient
        self.suffix = volume_suffix(path)

    def error(self, message: str) -> VolumeFileError:
        return VolumeFileError(f"patient {self.patient}: {message} (file {self.path.name})")

    def itk_error(self, exc: RuntimeError, native: str) -> VolumeFileError:
        """A one-line error from SimpleITK's multi-line exception text and what its libraries
        printed (`native`)."""
        found = _ITK_REASON.search(str(exc))
        reason = " ".join((found["reason"] if found else str(exc)).split())
        short = _METAIMAGE_SHORT.search(native)
        if short:
            header = self.suffix == METAIMAGE_HEADER_SUFFIX
            data = metaimage_data_file(self.path) if header else None
            where = f"data file {data.name}" if data is not None else "data"
            return self.error(
                f"expected {short[1]} bytes of voxels, received {short[2]}: the MetaImage "
                f"{where} is truncated"
            )
        if native:
            reason = f"{_STALE_ERRNO.sub('', reason).rstrip('. ')} ({native})"
        format_name = VOLUME_FORMATS[self.suffix][0]
        return self.error(f"expected a readable {format_name} file, received an error: {reason}")

    def run(self, step: Callable[[], _T]) -> _T:
        """`step()`, a SimpleITK call, with its errors and printed complaints made one line."""
        result, printed = self.run_collecting(step)
        self.warn_printed(printed)
        return result

    def run_collecting(self, step: Callable[[], _T]) -> tuple[_T, str]:
        """`step()` with its errors made one line; what SimpleITK printed is returned, for a
        warning once the caller's own checks pass (an error of theirs says more)."""
        native = NativeStderr()
        try:
            with native:
                result = step()
        except RuntimeError as exc:
            raise self.itk_error(exc, native.text) from exc
        return result, native.text

    def warn_printed(self, printed: str) -> None:
        if printed:
            logger.warning("patient %s: %s: SimpleITK: %s", self.patient, self.path.name,
                           printed)

    def check_nifti_length(self, reader: sitk.ImageFileReader) -> None:
        """Raise when a NIfTI file holds fewer bytes than its header promises.

        SimpleITK reads a truncated NIfTI file (plain or gzip-compressed) without complaint,
        the missing voxels set to 0 HU, so the length is checked here: the file size, or for
        `.nii.gz` the decompressed length (one extra decompression pass; it also verifies the
        gzip checksum).
        """
        voxels = int(np.prod(reader.GetSize(), dtype=np.int64))
        bytes_per_voxel = int(reader.GetMetaData("bitpix")) // BITS_PER_BYTE
        needed = int(float(reader.GetMetaData("vox_offset"))) + voxels * bytes_per_voxel
        if self.suffix == NIFTI_GZIP_SUFFIX:
            with open(self.path, "rb") as f:
                if f.read(len(GZIP_MAGIC)) != GZIP_MAGIC:
                    raise self.error(
                        f"expected gzip-compressed data (the {NIFTI_GZIP_SUFFIX} suffix), "
                        f"received an uncompressed file: name it .nii or compress it"
                    )
            available = 0
            try:
                with gzip.open(self.path) as f:
                    while chunk := f.read(GZIP_CHUNK_BYTES):
                        available += len(chunk)
            except (EOFError, OSError, zlib.error) as exc:
                raise self.error(
                    f"expected a complete gzip-compressed NIfTI file, received a truncated or "
                    f"corrupt one ({exc})"
                ) from exc
        else:
            available = self.path.stat().st_size
        if available < needed:
            raise self.error(
                f"expected {needed} bytes of NIfTI header and voxels, received {available}: "
                f"the file is truncated"
            )

    def open(self) -> sitk.ImageFileReader:
        """A reader with the header read and checked (by SimpleITK before any voxel is read; a
        NIfTI file's length and a floating-point one's values are checked on the file)."""
        if self.suffix is None:
            raise self.error(
                f"expected a volume file named {', '.join(VOLUME_FORMATS)}, received "
                f"{self.path.name}"
            )
        if not self.path.is_file():
            raise self.error(f"expected a volume file, received a missing path {self.path}")
        written = self.path.name[-len(self.suffix):]
        if self.suffix in NIFTI_SUFFIXES and written not in (written.lower(), written.upper()):
            raise self.error(
                f"expected the NIfTI suffix in one case ({self.suffix} or {self.suffix.upper()}: "
                f"the NIfTI library refuses others), received {written}: rename the file"
            )
        if self.suffix in NIFTI_SUFFIXES and self.nifti_header_bytes() == NIFTI2_HEADER_BYTES:
            # SimpleITK's own message ("bad dim[0]") reads as a damaged file (found in review).
            raise self.error("expected a NIfTI-1 file, received a NIfTI-2 one, which kdsb does "
                             "not read: save it as NIfTI-1 (nibabel's Nifti1Image)")
        image_io = VOLUME_FORMATS[self.suffix][1]
        if self.suffix == METAIMAGE_HEADER_SUFFIX:
            data = metaimage_data_file(self.path)
            if data is not None and not data.is_file():
                raise self.error(
                    f"expected the MetaImage data file {data.name} beside its header, "
                    f"received none"
                )
        import SimpleITK as sitk  # 60 ms: not for DICOM folders, which most cohorts are

        reader = sitk.ImageFileReader()
        reader.SetImageIO(image_io)
        reader.SetFileName(str(self.path))
        _, printed = self.run_collecting(reader.ReadImageInformation)
        size = reader.GetSize()
        shape = "×".join(str(n) for n in size)
        if reader.GetDimension() != IMAGE_DIMENSION:
            raise self.error(
                f"expected a {IMAGE_DIMENSION}D image, received a {reader.GetDimension()}D "
                f"image of {shape} voxels"
            )
        pixel_id = reader.GetPixelID()
        scalar = {getattr(sitk, name) for name in SCALAR_PIXEL_TYPES}
        if pixel_id not in scalar or reader.GetNumberOfComponents() != 1:
            raise self.error(
                f"expected one integer or real value per voxel, received "
                f"{sitk.GetPixelIDValueAsString(pixel_id)} pixels"
            )
        if min(size) < MIN_SLICES:
            raise self.error(
                f"expected at least {MIN_SLICES} voxels along every axis, received {shape}"
            )
        if self.suffix in NIFTI_SUFFIXES:
            self.check_nifti_length(reader)
            self.check_nifti(reader)
        elif self.suffix in NRRD_SUFFIXES:
            # Without an anatomical space SimpleITK takes the axes as LPS (identity directions
            # and origin 0 where there is no field; `scanner-xyz`, `3D-right-handed` as they
            # are: found in review): left, anterior and up unknown.
            space = reader.GetMetaData(NRRD_SPACE_KEY) \
                if NRRD_SPACE_KEY in reader.GetMetaDataKeys() else None
            if space is None or space.removesuffix("-time") not in NRRD_PATIENT_SPACES:
                raise self.error("expected the patient space in the NRRD header (a 'space:' "
                                 "field, e.g. left-posterior-superior), received "
                                 f"{space or 'none'}: its orientation is unknown")
        self.warn_printed(printed)
        return reader

    def check_nifti(self, reader: sitk.ImageFileReader) -> None:
        """Raise when a NIfTI file's geometry or values are not what SimpleITK would make of
        them, read once more with nibabel (the header; the values only when stored as floats).

        - Geometry: SimpleITK takes the spacing from pixdim and the directions and origin from
          the sform (or the qform), and reads a file with neither coded as identity directions
          at origin 0; an sform whose voxel sizes are not pixdim's then gave a volume resampled
          from the wrong voxel size, with a warning only. The geometry SimpleITK read must be
          the header's coded sform or qform.
        - Values: SimpleITK (2.5) returns NaN and infinite voxels as 0, soft tissue, without a
          word (a NaN outside the field of view became millions of 0 HU voxels); integer
          storage cannot hold them and costs nothing.
        """
        import nibabel

        try:
            image = nibabel.load(self.path)
        except (nibabel.filebasedimages.ImageFileError, OSError, ValueError) as exc:
            raise self.error(f"expected a readable NIfTI file, received an error: {exc}") from exc
        self.check_nifti_geometry(reader, image)
        if image.get_data_dtype().kind != "f":
            return
        try:
            stored = np.asanyarray(image.dataobj.get_unscaled())
        except (OSError, ValueError) as exc:
            raise self.error(f"expected a readable NIfTI file, received an error: {exc}") from exc
        self.check_finite(stored)

    def check_nifti_geometry(self, reader: sitk.ImageFileReader, image) -> None:
        """See `check_nifti`; `image` is nibabel's."""
        coded = [(name, affine) for name, (affine, _) in (("sform", image.get_sform(coded=True)),
                                                          ("qform", image.get_qform(coded=True)))
                 if affine is not None]
        if not coded:
            raise self.error(
                "expected the patient orientation in the NIfTI header (sform_code or "
                "qform_code above 0), received neither: which way is left, anterior or up is "
                "unknown (set the qform, e.g. with nibabel, or convert the file)"
            )
        direction = np.asarray(reader.GetDirection(), dtype=np.float64).reshape(3, 3)
        spacing = np.asarray(reader.GetSpacing(), dtype=np.float64)
        origin = np.asarray(reader.GetOrigin(), dtype=np.float64)
        read = np.column_stack([LPS_TO_RAS @ direction * spacing, LPS_TO_RAS @ origin])
        if not any(np.allclose(read, affine[:3], rtol=0, atol=NIFTI_GEOMETRY_TOLERANCE_MM)
                   for _, affine in coded):
            name, affine = coded[0]
            sizes = np.linalg.norm(affine[:3, :3], axis=0)
            raise self.error(
                f"expected the NIfTI header's pixdim and its coded {name} to agree, received "
                f"voxel sizes {_rounded(spacing)} mm and origin {_rounded(read[:, 3])} mm (RAS) "
                f"as read, against {_rounded(sizes)} mm and {_rounded(affine[:3, 3])} mm in the "
                f"{name}: fix the header"
            )

    def nifti_header_bytes(self) -> int | None:
        """The NIfTI header's size as the file states it (`sizeof_hdr`: 348 for NIfTI-1, 540
        for NIfTI-2, in either byte order); None where the file is too short or unreadable
        (SimpleITK then says what is wrong)."""
        opener = gzip.open if self.suffix == NIFTI_GZIP_SUFFIX else open
        try:
            with opener(self.path, "rb") as file:
                head = file.read(4)
        except (OSError, EOFError):
            return None
        if len(head) < 4:
            return None
        little, big = int.from_bytes(head, "little"), int.from_bytes(head, "big")
        return next((size for size in (little, big) if size in NIFTI_HEADER_SIZES), little)

    def check_finite(self, values: np.ndarray) -> None:
        bad = np.count_nonzero(~np.isfinite(values))
        if bad:
            raise self.error(f"expected finite values, received {bad} NaN or infinite voxels")

    def canonical_order(self, direction: np.ndarray) -> list[tuple[int, int]]:
        """(patient axis 0 X, 1 Y, 2 Z, sign) of each NumPy axis of the file's array.

        Args:
            direction: the 3×3 direction matrix, LPS; column d is the direction of index axis d
                (i, j, k), which is NumPy axis 2 - d.
        """
        axes = []
        for index_axis in range(IMAGE_DIMENSION):
            cosine = direction[:, index_axis]
            found = patient_axis(cosine)
            if found is None:
                raise self.error(
                    f"expected the {IMAGE_AXES[index_axis]} axis aligned with a patient axis, "
                    f"received an oblique direction {np.round(cosine, 4).tolist()} (LPS)"
                )
            axes.append(found)
        if len({axis for axis, _ in axes}) != IMAGE_DIMENSION:
            raise self.error(
                f"expected image axes along three different patient axes, received the "
                f"direction matrix {np.round(direction, 4).tolist()}"
            )
        return axes[::-1]

    def hounsfield(self, values: np.ndarray) -> np.ndarray:
        """The stored values as int16 HU (see the module docstring); may reuse `values`."""
        if values.dtype.kind == "f":
            self.check_finite(values)
            np.rint(values, out=values)
        low, high = values.min(), values.max()
        reason = not_hounsfield(low, high, air_share(values))
        if reason is not None:
            raise self.error(reason)
        if values.dtype != np.int16:
            if low < INT16_MIN or high > INT16_MAX:
                values = np.clip(values, INT16_MIN, INT16_MAX)
            values = values.astype(np.int16)
        values[values <= OUTSIDE_FIELD_HU] = AIR_HU
        return values

    def read(self) -> CTSeries:
        image = self.run(self.open().Execute)
        direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
        axes = self.canonical_order(direction)
        step = np.asarray(image.GetSpacing(), dtype=np.float64)[::-1]  # per NumPy axis, mm
        corner = np.asarray(image.GetOrigin(), dtype=np.float64)  # LPS X, Y, Z of voxel 0
        if self.suffix in NIFTI_SUFFIXES:
            step, corner = shortest_float32(step), shortest_float32(corner)
        import SimpleITK as sitk

        values = sitk.GetArrayFromImage(image)  # (k, j, i): NumPy axis a is index axis 2 - a
        del image
        hu = self.hounsfield(values)
        del values

        # Canonical axis c (0 Z, 1 Y, 2 X) is patient axis 2 - c.
        order = [next(a for a, (axis, _) in enumerate(axes) if axis == 2 - c) for c in range(3)]
        canonical = hu.transpose(order)
        flips = tuple(c for c, a in enumerate(order) if axes[a][1] < 0)
        if flips:
            canonical = np.flip(canonical, axis=flips)
        canonical = np.ascontiguousarray(canonical)
        # Patient coordinate of canonical voxel [0, 0, 0]: the file's voxel 0 moved to the far
        # end of every axis that runs against its patient axis.
        for a, (_, sign) in enumerate(axes):
            if sign < 0:
                index_axis = IMAGE_DIMENSION - 1 - a
                corner = corner + (hu.shape[a] - 1) * step[a] * direction[:, index_axis]
        spacing = tuple(round(float(step[a]), MM_DECIMALS) for a in order)
        origin = tuple(round(float(corner[2 - c]), MM_DECIMALS) for c in range(3))
        logger.debug(
            "patient %s: %s, shape %s, spacing %s mm, origin %s mm",
            self.patient, self.path.name, canonical.shape, spacing, origin,
        )
        return CTSeries(
            hu=canonical,
            spacing=spacing,
            origin=origin,
            series_uid=f"{SERIES_UID_PREFIX}{self.path.name}",
        )


def shortest_float32(values: np.ndarray) -> np.ndarray:
    """Each value as the shortest decimal that rounds to the same float32 (0.699999988 → 0.7),
    unless the float32 is a short binary fraction, kept exact (0.677734375 = 347/512 mm, a
    common pixel size, and origins made of it): NIfTI-1 stores spacing and affine in float32,
    and the value its writer meant is the one DICOM and text headers give, so they then agree
    exactly. Away from 0 float32 values are whole multiples of 1/4096 by chance (1 in 32 from
    64 mm, 1 in 8 from 256 mm, every one from 2048 mm), and such a decimal stays its float32,
    off by under 0.0001 mm. (NIfTI-2, in float64, is not read: SimpleITK's NIfTI reader does
    not recognise it.)"""
    as_float32 = [float(np.float32(value)) for value in values]
    return np.array([v if (v * BINARY_FRACTION_SCALE).is_integer() else float(str(np.float32(v)))
                     for v in as_float32])


def read_image(path: str | Path, patient_id: str | None = None) -> CTSeries:
    """Read a NIfTI, MetaImage or NRRD file as one canonical int16 HU volume.

    Args:
        path: the volume file (`.nii`, `.nii.gz`, `.mhd` with its data file, `.mha`, `.nrrd`,
            `.nhdr` with its data file).
        patient_id: the name used in messages; the file name without its suffix if None.

    Returns:
        The volume: HU shape (z, y, x) along patient Z, Y, X increasing, spacing and origin in
        mm in (z, y, x) order, series_uid `"file:<file name>"`.

    Raises:
        VolumeFileError: the file is missing, unreadable, not a 3D scalar image, oblique, or
            plainly not in HU; the one-line message names the patient and the file.
    """
    path = Path(path)
    return _Reader(path, patient_id or volume_id(path) or path.name).read()
