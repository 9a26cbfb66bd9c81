"""Choosing a patient's CT series among the folder's images: images only, no localizers, CT
only, one patient, the series with the most slice positions in its majority orientation."""

from __future__ import annotations

import logging
from collections import Counter, defaultdict

import numpy as np

from kdsb.io.dicom.files import patient_error
from kdsb.io.dicom.headers import Header

logger = logging.getLogger(__name__)

CT_MODALITY = "CT"
LOCALIZER_TYPE = "LOCALIZER"


def choose_series(patient: str, headers: list[Header]) -> list[Header]:
    """The images of the CT series with the most distinct slice positions."""
    images = [h for h in headers if h.rows is not None]
    if len(images) < len(headers):
        logger.info(
            "patient %s: dropped %d DICOM object(s) without an image",
            patient, len(headers) - len(images),
        )
    if not images:
        raise patient_error(
            patient, "expected CT images, received only DICOM objects without an image")
    localizers = [h for h in images if LOCALIZER_TYPE in h.image_type]
    if localizers:
        logger.info("patient %s: dropped %d localizer image(s)", patient, len(localizers))
    images = [h for h in images if LOCALIZER_TYPE not in h.image_type]
    if not images:
        raise patient_error(patient, "expected an axial CT series, received only localizer images")
    non_ct = Counter(h.modality for h in images if h.modality != CT_MODALITY)
    if non_ct:
        logger.info("patient %s: dropped non-CT images %s", patient, dict(non_ct))
    ct_images = [h for h in images if h.modality == CT_MODALITY]
    if not ct_images:
        received = ", ".join(sorted(non_ct))
        raise patient_error(patient, f"expected modality CT, received {received}")
    by_series: dict[str, list[Header]] = defaultdict(list)
    for header in ct_images:
        by_series[header.series_uid].append(header)
    patients = sorted({h.patient_id for h in ct_images if h.patient_id})
    if len(patients) > 1:  # found by a user's check: a cohort's dicom/ read as one patient
        raise patient_error(
            patient,
            f"expected one patient's series in a patient folder, received CT series of "
            f"{len(patients)} patients (PatientID {', '.join(patients[:3])}"
            f"{', …' if len(patients) > 3 else ''}): INPUT_ROOT is the folder holding one "
            f"sub-folder per patient",
        )
    candidates = {uid: _majority_orientation(patient, uid, hs) for uid, hs in by_series.items()}

    def n_positions(hs: list[Header]) -> int:
        return len({tuple(np.round(h.position, 2)) for h in hs if h.position is not None})

    ranked = sorted(candidates.items(), key=lambda item: (-n_positions(item[1]), item[0]))
    uid, chosen = ranked[0]
    positions = n_positions(chosen)
    tied = [other_uid for other_uid, other in ranked[1:] if n_positions(other) == positions]
    if tied:  # two reconstructions of one scan (two kernels?): the choice is arbitrary
        # (A series without a UID sorts first: found by a user's trial, the reason read "the
        # one without a SeriesInstanceUID (the smallest SeriesInstanceUID)". Named with its
        # description and kernel: found by another, the UIDs alone told a clinician nothing.)
        def named(series: str) -> str:
            description = candidates[series][0].description
            name = series or "without a SeriesInstanceUID"
            return f"{name} ({description})" if description else name

        logger.warning(
            "patient %s: series %s and %s cover the same %d slice positions; kept %s (%s): "
            "give the patient one series to choose the other",
            patient, named(uid), ", ".join(named(t) for t in tied), positions,
            uid or "the one without a SeriesInstanceUID",
            "the smallest SeriesInstanceUID" if uid else "a series without one comes first",
        )
    for other_uid, other in ranked[1:]:
        logger.info(
            "patient %s: dropped series %s (%d images; kept %s with %d)",
            patient, other_uid or "without a SeriesInstanceUID", len(other),
            uid or "the one without a SeriesInstanceUID", len(chosen),
        )
    return chosen


def _majority_orientation(patient: str, uid: str, headers: list[Header]) -> list[Header]:
    """The images of one series that share its most common orientation."""
    counts = Counter(h.orientation_key() for h in headers)
    key, _ = counts.most_common(1)[0]
    kept = [h for h in headers if h.orientation_key() == key]
    if len(kept) < len(headers):
        logger.info(
            "patient %s: series %s: dropped %d image(s) of another orientation",
            patient, uid, len(headers) - len(kept),
        )
    return kept

