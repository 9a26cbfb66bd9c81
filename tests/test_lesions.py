"""Lesions implanted into CT volumes (kdsb.phantoms.lesions), and the lung mask keeping them."""

from __future__ import annotations

import numpy as np
import pytest

from kdsb.errors import KdsbError
from kdsb.phantoms import lesions
from kdsb.phantoms.anatomy import make_phantom
from kdsb.preprocessing.lungs import segment_lungs


@pytest.fixture(scope="module")
def base():
    """A healthy adult-size phantom chest (no nodules) and its lung mask."""
    phantom = make_phantom(np.random.default_rng(3), size=128, cancer=False, scale=1.0,
                           slice_mm=2.0)
    lungs = segment_lungs(phantom.hu, phantom.spacing) > 0
    return phantom, lungs, lesions.surface_places(lungs, phantom.spacing)


def _implant(base, kind, place, radius, seed=0):
    phantom, lungs, sites = base
    hu = phantom.hu.copy()
    truth, lesion = lesions.implant_lesion(
        hu, phantom.spacing, phantom.origin, lungs, kind=kind, place=place, radius_mm=radius,
        rng=np.random.default_rng(seed), sites=sites,
    )
    return hu, truth, lesion


def test_surface_places_lie_where_their_names_say(base):
    phantom, lungs, (sites, _) = base
    columns = lungs.sum(axis=(0, 1))
    midline = np.dot(np.arange(columns.size), columns) / columns.sum()
    zs = np.flatnonzero(lungs.any(axis=(1, 2)))
    lateral = np.abs(sites["lateral"][:, 2] - midline).mean()
    medial = np.abs(sites["paramediastinal"][:, 2] - midline).mean()
    assert lateral > 1.5 * medial
    assert sites["apical"][:, 0].min() > zs[0] + 0.8 * (zs[-1] - zs[0])
    assert sites["diaphragmatic"][:, 0].mean() < sites["apical"][:, 0].mean()
    assert sites["anterior"][:, 1].mean() < sites["paravertebral"][:, 1].mean()  # y: front → back


@pytest.mark.parametrize("kind", lesions.KINDS)
def test_each_kind_is_painted_inside_the_lung_with_its_density(base, kind):
    phantom, lungs, _ = base
    radius = 5.0 if kind == "small_solid" else 12.0
    hu, truth, lesion = _implant(base, kind, "intrapulmonary", radius)
    assert truth.any() and not (truth & ~lungs).any()
    assert lesion.voxels == truth.sum()
    assert lesion.volume_ml == pytest.approx(truth.sum() * np.prod(phantom.spacing) / 1000, 1e-3)
    nominal = 4 / 3 * np.pi * radius**3 / 1000
    assert 0.5 * nominal < lesion.volume_ml < 2.0 * nominal
    inner = hu[truth].astype(float)
    if kind in ("ground_glass",):
        assert -760 < np.median(inner) < -250
    elif kind == "part_solid":
        assert np.median(inner) < -150 and (inner > -100).mean() > 0.01  # glass + solid core
    else:
        assert np.median(inner) > -150
    assert (hu[~truth] == phantom.hu[~truth]).mean() > 0.999  # the rest barely touched (edges)


def test_pleural_lesions_touch_the_lung_surface(base):
    phantom, lungs, _ = base
    from scipy import ndimage

    surface = lungs & ~ndimage.binary_erosion(lungs)
    for place in lesions.PLACES[1:]:  # every place but inside the lung
        _, truth, lesion = _implant(base, "solid", place, 10.0)
        assert lesion.place == place
        assert (truth & surface).sum() > 10, place


@pytest.mark.parametrize("place", lesions.PLACES)
def test_mask_keeps_a_juxtapleural_mass_at_every_place(base, place):
    phantom, _, _ = base
    hu, truth, _ = _implant(base, "solid", place, 12.0, seed=7)
    mask = segment_lungs(hu, phantom.spacing) > 0
    assert mask[truth].mean() >= 0.9


def test_bad_lesion_requests_are_clear_errors(base):
    with pytest.raises(KdsbError, match="expected a lesion kind among"):
        _implant(base, "cyst", "lateral", 5.0)
    with pytest.raises(KdsbError, match="expected a lesion place among"):
        _implant(base, "solid", "liver", 5.0)
    with pytest.raises(KdsbError, match="expected a positive lesion radius"):
        _implant(base, "solid", "lateral", -1.0)
    with pytest.raises(KdsbError, match="expected room for an intrapulmonary lesion"):
        _implant(base, "solid", "intrapulmonary", 300.0)


def test_parenchyma_leaves_out_a_mask_s_reach_beyond_the_lungs(base):
    """Lesions are placed in and clipped to `lung_parenchyma`: tissue a lung mask takes in
    beside the lungs never becomes lesion truth, while the vessels inside stay lung."""
    from scipy import ndimage

    phantom, lungs, _ = base
    over_reaching = ndimage.binary_dilation(lungs, iterations=3)  # 3 voxels of wall and more
    parenchyma = lesions.lung_parenchyma(phantom.hu, over_reaching, phantom.spacing)
    beside = over_reaching & ~lungs & (phantom.hu >= -400)  # wall, mediastinum, diaphragm
    assert beside.sum() > 0.05 * lungs.sum()
    assert (parenchyma & beside).sum() <= 0.01 * beside.sum()  # airway walls, enclosed
    vessels = ndimage.binary_erosion(lungs, iterations=3) & (phantom.hu >= -400)  # deep inside
    assert vessels.any() and parenchyma[vessels].mean() > 0.95
    hu = phantom.hu.copy()
    truth, _ = lesions.implant_lesion(
        hu, phantom.spacing, phantom.origin, parenchyma, kind="solid", place="lateral",
        radius_mm=15.0, rng=np.random.default_rng(1),
    )
    assert truth.any() and not (truth & ~parenchyma).any()


def test_parenchyma_never_bridges_two_lungs_at_their_junction():
    """Two lungs 8 mm apart (the anterior junction), joined by a thin strip of air at one
    end, inside one mask that takes in the tissue between them: one closing of both with a
    6 mm ball would bridge the gap; each side is closed on its own."""
    spacing = (2.0, 1.0, 1.0)
    hu = np.full((20, 60, 80), 40, np.int16)
    hu[2:18, 10:50, 10:36] = -850  # right lung
    hu[2:18, 10:50, 44:70] = -850  # left lung
    hu[2:18, 10:13, 36:44] = -850  # where they touch
    mask = np.zeros(hu.shape, bool)
    mask[2:18, 10:50, 10:70] = True
    parenchyma = lesions.lung_parenchyma(hu, mask, spacing)
    junction = np.zeros(hu.shape, bool)
    junction[2:18, 16:44, 37:43] = True
    assert not parenchyma[junction].any()
    assert parenchyma[hu < -400].all()


def test_intrapulmonary_lesion_in_a_lung_too_small_for_its_margin_may_touch_the_pleura():
    spacing = (1.0, 1.0, 1.0)
    z, y, x = np.indices((40, 40, 40))
    lung = (z - 20) ** 2 + (y - 20) ** 2 + (x - 20) ** 2 <= 13**2  # 13 mm deep at most
    hu = np.where(lung, -850, 40).astype(np.int16)
    truth, lesion = lesions.implant_lesion(
        hu, spacing, (0.0, 0.0, 0.0), lung, kind="solid", place="intrapulmonary",
        radius_mm=12.0, rng=np.random.default_rng(0),
    )
    assert lesion.place == "intrapulmonary" and truth.sum() > 1000
    assert not (truth & ~lung).any()
