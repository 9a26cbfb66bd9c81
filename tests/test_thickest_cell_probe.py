"""benchmarks/thickest_cell_probe.py: the deepest tissue, its encoder cell, and the probes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "thickest_cell_probe.py"


@pytest.fixture
def probe(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script adds the repository to it
    spec = importlib.util.spec_from_file_location("thickest_cell_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_deepest_voxel_gives_the_ball_radius_and_the_cell_holding_it(probe, tmp_path):
    """A 10 mm ball of tissue inside the lung mask, off-centre; a 20 mm chest wall outside it:
    the depth is the ball's radius (the wall is masked out) and the features are those of the
    encoder's cell centred nearest the ball's centre."""
    pytest.importorskip("tensorflow")
    import keras

    from kdsb.data.inputs import VolumeInput
    from kdsb.io import volumes

    spacing = (2.0, 2.0, 2.0)
    z, y, x = np.ogrid[:24, :32, :48]
    centre = (14, 20, 28)
    hu = np.full((24, 32, 48), -850, dtype=np.int16)
    hu[(z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= 5**2] = 30
    hu[:, :, 38:] = 50  # the chest wall, outside the mask: thicker than the ball, not counted
    mask = np.zeros(hu.shape, dtype=np.uint8)
    mask[:, :, :38] = 1
    path = volumes.volume_path(tmp_path, "p")
    volumes.write_volume(path, hu, mask, spacing, (0.0, 0.0, 0.0))

    inputs = keras.Input((None, None, None, 1))
    cells = keras.layers.Conv3D(2, 3, strides=2, padding="same")(inputs)
    cells = keras.layers.Conv3D(3, 3, strides=2, padding="same")(cells)
    encoder = keras.Model(inputs, cells)
    volume_input = VolumeInput(lung_dilation_mm=0.0).fit_to([path])
    depth, features = probe.thickest_cell(volume_input, encoder, path)

    assert 9.0 <= depth <= 11.0
    grid = np.asarray(encoder(volume_input.read(path)[np.newaxis]))[0]
    # Cell i of two stride-2 "same" convolutions of kernel 3 is centred on voxel 4i + 3 (even
    # extents: TensorFlow pads after the data): the ball's centre is nearest that of cell
    # (3, 4, 6), not in the 4³ block (3, 5, 7) nor the cell below it (2, 4, 6).
    np.testing.assert_allclose(features, grid[3, 4, 6], rtol=1e-6)
    for other in ((3, 5, 7), (2, 4, 6)):
        assert not np.allclose(features, grid[other])


def test_the_probes_fit_on_the_first_n_and_score_the_held_out_cohort(probe):
    """The held-out patients with cancer are the larger, the features are noise. The first 8
    training patients agree, the 16 after them say the opposite: fitted on the first 8, size
    ranks the held-out cohort perfectly; on all 24, backwards. Every (n, probe) has a row."""
    rng = np.random.default_rng(0)

    def cohort(count, larger_is_cancer=True):
        labels = np.arange(count) % 2
        sign = 1.0 if larger_is_cancer else -1.0
        return [(10.0 + sign * 10.0 * y + rng.uniform(0, 5), rng.normal(size=4), int(y))
                for y in labels]

    train = cohort(8) + cohort(16, larger_is_cancer=False)
    table = probe.probe_table(train, cohort(16), [8, 24])
    assert [(n, name) for n, name, _, _ in table] == [
        (n, name) for n in (8, 24) for name in probe.PROBES]
    size_auc = {n: auc for n, name, auc, _ in table if name == "size"}
    assert size_auc == {8: 1.0, 24: 0.0}
    assert all(0.0 <= auc <= 1.0 and loss > 0 for _, _, auc, loss in table)


def test_the_command_prints_a_row_per_size_and_probe(probe, tmp_path, capsys):
    """A seed folder of benchmarks/classifier.py's layout and a saved GMCAE: the probe reads
    every volume as the mil head does and prints the table; size (a ball of 8 mm against 4 mm)
    ranks the held-out patients perfectly."""
    pytest.importorskip("tensorflow")
    from kdsb.io import volumes
    from kdsb.io.tables import write_labels
    from kdsb.models.gmcae import build_gmcae

    z, y, x = np.ogrid[:16, :24, :24]
    seed_dir = tmp_path / "seed_0"
    for split, count in (("train", 6), ("test", 4)):
        labels = []
        for k in range(count):
            label = k % 2
            hu = np.full((16, 24, 24), -850, dtype=np.int16)
            radius = 4 if label else 2  # voxels of 2 mm
            hu[(z - 8) ** 2 + (y - 12) ** 2 + (x - 10 - k % 3) ** 2 <= radius**2] = 30
            pid = f"{split}_{k}"
            volumes.write_volume(volumes.volume_path(seed_dir / "volumes" / split, pid), hu,
                                 np.ones(hu.shape, np.uint8), (2.0,) * 3, (0.0, 0.0, 0.0))
            labels.append((pid, label))
        write_labels(seed_dir / ("labels_6.csv" if split == "train" else
                                 "test_cohort/labels.csv"), labels)
    gmcae = tmp_path / "gmcae.keras"
    build_gmcae(patch_size=8, width=2, mixtures=2).save(gmcae)

    assert probe.main([str(seed_dir), str(gmcae), "--sizes", "4", "6"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.strip()[:1].isdigit()]
    assert [(r[0], " ".join(r[1:-2])) for r in rows] == [
        (n, name) for n in ("4", "6") for name in probe.PROBES]
    assert [r[-2] for r in rows if r[1:-2] == ["size"]] == ["1.000", "1.000"]
