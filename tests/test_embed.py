"""`kdsb embed`: GMCAE features per patient; odd patients ranked first; neighbours; map."""

from __future__ import annotations

import csv
import logging

import numpy as np
import pytest

from kdsb.cli import main
from kdsb.io import volumes
from kdsb.phantoms.anatomy import make_phantom

ORDINARY = 7


def _write(folder, patient_id, hu, lung, spacing, origin):
    volumes.write_volume(volumes.volume_path(folder, patient_id), hu, lung, spacing, origin)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Seven ordinary phantom chests, one emphysema-like (dark lungs full of bullae) and one
    with metal streaks across the lungs; an untrained (seeded) GMCAE: its features already tell
    such patients apart, and training one costs minutes on a CPU."""
    import keras

    from kdsb.models.gmcae import build_gmcae

    root = tmp_path_factory.mktemp("embed")
    data = root / "data"
    rng = np.random.default_rng(7)
    for index in range(ORDINARY + 2):
        phantom = make_phantom(rng, size=96, cancer=bool(index % 2), scale=0.7)
        hu, lung = phantom.hu.copy(), phantom.lung_mask > 0
        if index == ORDINARY:  # emphysema-like: lung at -990 HU with large holes
            hu[lung] = rng.normal(-990, 8, size=lung.sum()).astype(np.int16)
        if index == ORDINARY + 1:  # metal streaks: bright lines through every slice
            for row in range(10, hu.shape[1] - 10, 9):
                hu[:, row, :] = np.where(lung[:, row, :], 3000, hu[:, row, :])
        _write(data, f"p{index:02d}", hu, phantom.lung_mask, phantom.spacing, phantom.origin)
    keras.utils.set_random_seed(0)
    build_gmcae(width=4, mixtures=2).save(root / "gmcae.keras")
    (root / "labels.csv").write_text(
        "id,cancer\n" + "".join(f"p{i:02d},{i % 2}\n" for i in range(ORDINARY)))
    return root


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_odd_patients_rank_first_and_every_file_is_written(cohort, tmp_path):
    out = tmp_path / "out"
    code = main(["embed", str(cohort / "data"), str(cohort / "gmcae.keras"), str(out),
                 "--labels", str(cohort / "labels.csv"), "--patches", "16", "--neighbours", "3"])
    assert code == 0
    outliers = _rows(out / "outliers.csv")
    assert [r["rank"] for r in outliers] == [str(i) for i in range(1, ORDINARY + 3)]
    assert {r["id"] for r in outliers[:2]} == {f"p{ORDINARY:02d}", f"p{ORDINARY + 1:02d}"}
    scores = [float(r["score"]) for r in outliers]
    assert scores == sorted(scores, reverse=True)

    embeddings = _rows(out / "embeddings.csv")
    assert [r["id"] for r in embeddings] == [f"p{i:02d}" for i in range(ORDINARY + 2)]
    features = [k for k in embeddings[0] if k.startswith("emb_")]
    # Mean and max of the width-4 encoder's 16 channels, named so (found by a user's trial).
    assert features == ([f"emb_mean_{i:03d}" for i in range(16)]
                        + [f"emb_max_{i:03d}" for i in range(16)])
    assert all(np.isfinite(float(r[k])) for r in embeddings for k in features + ["nll_top"])
    nll = {r["id"]: float(r["nll_top"]) for r in embeddings}
    assert nll[f"p{ORDINARY:02d}"] > max(nll[f"p{i:02d}"] for i in range(ORDINARY))

    neighbours = _rows(out / "neighbours.csv")
    assert len(neighbours) == 3 * (ORDINARY + 2)
    assert all(r["id"] != r["neighbour"] for r in neighbours)
    first = [r for r in neighbours if r["id"] == "p00"]
    distances = [float(r["distance"]) for r in first]
    assert distances == sorted(distances) and distances[0] > 0
    assert (out / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_gmcae_that_is_not_one_is_a_clear_error(cohort, tmp_path, capsys, caplog):
    import keras

    bad = tmp_path / "not.keras"
    bad.write_text("not a model")
    assert main(["embed", str(cohort / "data"), str(bad), str(tmp_path / "out")]) == 1
    assert "expected a kdsb GMCAE saved as .keras" in capsys.readouterr().err
    # A model of another kind (a classifier) is refused alone, exit 2 (found by a user's trial:
    # a warning of no gmcae.json beside it came first, as if the run went on).
    other = tmp_path / "other" / "classifier.keras"
    other.parent.mkdir()
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)]).save(other)
    with caplog.at_level(logging.WARNING):
        assert main(["embed", str(cohort / "data"), str(other), str(tmp_path / "out")]) == 2
    assert "expected a kdsb GMCAE, received" in capsys.readouterr().err
    assert "gmcae.json" not in caplog.text
    assert main(["embed", str(cohort / "data"), str(cohort / "gmcae.keras"),
                 str(tmp_path / "out"), "--patches", "0"]) == 2
    assert "expected --patches >= 1, received 0" in capsys.readouterr().err
    assert main(["embed", str(cohort / "data"), str(cohort / "gmcae.keras"),
                 str(tmp_path / "out"), "--patches", "8", "--top", "9"]) == 2
    assert "expected --top at most --patches (8), received 9" in capsys.readouterr().err


def test_volumes_of_another_spacing_than_the_gmcaes_fail_alone(cohort, tmp_path, capsys,
                                                                monkeypatch):
    from kdsb.data.inputs import save_gmcae_spacing

    model_dir = tmp_path / "run"
    model_dir.mkdir()
    (model_dir / "gmcae.keras").symlink_to(cohort / "gmcae.keras")
    data = tmp_path / "data"
    save_gmcae_spacing(model_dir, (2.0, 2.5, 2.5))
    for path in sorted((cohort / "data").glob("*.h5")):
        volume = volumes.read_volume(path)
        spacing = (4.0, 2.5, 2.5) if path.stem == "p01" else (2.0, 2.5, 2.5)
        _write(data, path.stem, volume.hu, volume.lung_mask, spacing, volume.origin)
    out = tmp_path / "out"
    assert main(["embed", str(data), str(model_dir / "gmcae.keras"), str(out),
                 "--patches", "4"]) == 1
    err = capsys.readouterr().err
    assert "p01.h5: expected a spacing of" in err and "preprocess it with that --spacing" in err
    assert "p01" not in {r["id"] for r in _rows(out / "embeddings.csv")}
    assert len(_rows(out / "embeddings.csv")) == ORDINARY + 1
    # The journal stays (found in review: dropped, so a rerun embedded every patient again):
    # with p01 mended, a rerun embeds p01 alone.
    assert (out / "embed.partial").is_file()
    volume = volumes.read_volume(cohort / "data" / "p01.h5")
    _write(data, "p01", volume.hu, volume.lung_mask, (2.0, 2.5, 2.5), volume.origin)
    from kdsb.evaluation import embed
    from tests.interrupt import Interrupter

    counted = Interrupter(monkeypatch, embed, "patient_features")
    counted.next_run()
    assert main(["embed", str(data), str(model_dir / "gmcae.keras"), str(out),
                 "--patches", "4"]) == 0
    assert counted.calls == 1 and not (out / "embed.partial").exists()
    assert len(_rows(out / "embeddings.csv")) == ORDINARY + 2


def test_a_gmcae_of_16_voxel_patches_embeds(cohort, tmp_path):
    """The patch edge is the GMCAE's own (the demo's is 16; embed read 32³ patches and failed
    with a Keras traceback, found in review)."""
    import keras

    from kdsb.models.gmcae import build_gmcae

    keras.utils.set_random_seed(0)
    build_gmcae(patch_size=16, width=4, mixtures=2).save(tmp_path / "gmcae16.keras")
    out = tmp_path / "out"
    # Two patches and no --top: the default top (4) follows them (found in review: refused).
    assert main(["embed", str(cohort / "data"), str(tmp_path / "gmcae16.keras"), str(out),
                 "--patches", "2"]) == 0
    assert len(_rows(out / "embeddings.csv")) == ORDINARY + 2


def test_too_few_readable_patients_say_why_the_others_failed(cohort, tmp_path, capsys):
    from kdsb.data.inputs import save_gmcae_spacing

    model_dir = tmp_path / "run"
    model_dir.mkdir()
    (model_dir / "gmcae.keras").symlink_to(cohort / "gmcae.keras")
    save_gmcae_spacing(model_dir, (1.0, 1.0, 1.0))  # none of the volumes is at 1 mm
    assert main(["embed", str(cohort / "data"), str(model_dir / "gmcae.keras"),
                 str(tmp_path / "out"), "--patches", "4"]) == 1
    err = capsys.readouterr().err
    assert "expected at least 3 readable patients to compare, received 0; " in err
    assert "preprocess it with that --spacing" in err and f"(and {ORDINARY + 1} more failed)" in err


def test_fewer_patients_than_neighbours_asked_for_is_said(tmp_path, caplog):
    from kdsb.evaluation.embed import CohortEmbedding, write_embedding_files

    rng = np.random.default_rng(0)
    table = CohortEmbedding(["a", "b", "c", "d"], rng.normal(size=(4, 6)), rng.normal(size=(4, 3)))
    write_embedding_files(tmp_path, table, neighbours=9)
    assert "4 patients: 3 neighbours each, not the 9 asked for" in caplog.text
    assert len(_rows(tmp_path / "neighbours.csv")) == 4 * 3


def test_the_files_are_written_as_a_set(tmp_path, monkeypatch):
    """A run stopped while writing its files leaves the earlier run's four as they were, not
    new embeddings beside an old map (found in review); killed temporaries are swept."""
    from kdsb.evaluation import embed

    rng = np.random.default_rng(0)
    first = embed.CohortEmbedding(["a", "b", "c", "d"], rng.normal(size=(4, 6)),
                                  rng.normal(size=(4, 3)))
    paths = embed.write_embedding_files(tmp_path, first, neighbours=2)
    before = {path.name: path.read_bytes() for path in paths}
    (tmp_path / ".tmp-1-abcd1234-map.png").write_bytes(b"cut short")
    (tmp_path / ".tmp-1-abcd1234-.tmp-1-ef567890-outliers.csv").write_bytes(b"cut short")

    def map_fails(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(embed, "write_map", map_fails)
    second = embed.CohortEmbedding(["a", "b", "c", "e"], rng.normal(size=(4, 6)),
                                   rng.normal(size=(4, 3)))
    with pytest.raises(OSError, match="No space left"):
        embed.write_embedding_files(tmp_path, second, neighbours=2)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_killed_run_resumes_with_the_same_results(cohort, tmp_path, monkeypatch):
    from kdsb.evaluation import embed
    from tests.interrupt import Interrupter

    argv = ["embed", str(cohort / "data"), str(cohort / "gmcae.keras")]
    fresh, out = tmp_path / "fresh", tmp_path / "out"
    assert main([*argv, str(fresh), "--patches", "8"]) == 0
    sampling = Interrupter(monkeypatch, embed, "patient_features")
    sampling.next_run(limit=3)
    assert main([*argv, str(out), "--patches", "8"]) == 130
    assert sampling.calls == 3 and (out / "embed.partial").is_file()
    sampling.next_run()
    assert main([*argv, str(out), "--patches", "8"]) == 0
    assert sampling.calls == ORDINARY + 2 - 3
    for name in ("embeddings.csv", "outliers.csv", "neighbours.csv"):
        assert (out / name).read_bytes() == (fresh / name).read_bytes(), name
    assert not (out / "embed.partial").exists()
    # Each patient's patches are drawn with its own seed: another --seed takes nothing.
    sampling.next_run(limit=3)
    assert main([*argv, str(out), "--patches", "8"]) == 130
    sampling.next_run()
    assert main([*argv, str(out), "--patches", "8", "--seed", "1"]) == 0
    assert sampling.calls == ORDINARY + 2


def test_a_patients_features_do_not_depend_on_the_other_files(cohort, monkeypatch):
    """Found in review: patch seeds were seed + the patient's position in DATA_DIR, so adding a
    file changed every later patient's features. A non-finite feature fails its patient alone
    (it reached scikit-learn as a traceback after the whole cohort)."""
    import keras

    from kdsb.evaluation import embed

    gmcae = keras.saving.load_model(cohort / "gmcae.keras", safe_mode=True)
    files = volumes.list_volumes(cohort / "data")
    wanted = ["p01", "p02", "p03", "p04"]
    table, _ = embed.embed_cohort(gmcae, {i: files[i] for i in wanted}, patches=4, top=2,
                                  seed=3)
    fewer, _ = embed.embed_cohort(gmcae, {i: files[i] for i in wanted[1:]}, patches=4, top=2,
                                  seed=3)
    np.testing.assert_array_equal(fewer.embeddings, table.embeddings[1:])
    np.testing.assert_array_equal(fewer.nll, table.nll[1:])
    # One patient's row against a reference by hand: the encoder's codes and the GMCAE's NLL of
    # the same patches, each model run on its own (the table runs one two-output model).
    from kdsb.data.datasets import read_patches
    from kdsb.models.gmcae import encoder_of, mixtures_of
    from kdsb.models.losses import gaussian_mixture_nll, split_mixture_params

    rng = np.random.default_rng(embed.patient_seed(3, files["p02"]))
    x = read_patches(files["p02"], patch_size=int(gmcae.input_shape[1]), count=4,
                     sampling="lung", augment=False, rng=rng)[..., np.newaxis]
    pooled = np.asarray(encoder_of(gmcae).predict(x, verbose=0), np.float64).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(table.embeddings[1], np.concatenate([pooled.mean(0), pooled.max(0)]),
                               rtol=1e-5, atol=1e-6)
    nll = np.asarray(gaussian_mixture_nll(x.reshape(4, -1), *split_mixture_params(
        gmcae.predict(x, verbose=0), mixtures_of(gmcae))), np.float64)
    top = np.sort(nll)[::-1][:2].mean()
    np.testing.assert_allclose(table.nll[1], [nll.mean(), np.percentile(nll, 90), top],
                               rtol=1e-5)

    features = embed.patient_features

    def nan_for_p02(gmcae, both, path, *args):
        embedding, stats = features(gmcae, both, path, *args)
        return (embedding * np.nan if "p02" in str(path) else embedding), stats

    monkeypatch.setattr(embed, "patient_features", nan_for_p02)
    table, failed = embed.embed_cohort(gmcae, {i: files[i] for i in wanted}, patches=4, seed=3)
    assert table.ids == ["p01", "p03", "p04"]
    assert list(failed) == ["p02"] and "expected finite GMCAE features" in failed["p02"]
    # A volume gone since it was listed (a dangling link) fails alone too (found in review: its
    # stat ended the run).
    monkeypatch.undo()
    gone = {**{i: files[i] for i in wanted[1:]}, "p99": files["p01"].with_name("p99.h5")}
    table, failed = embed.embed_cohort(gmcae, gone, patches=4, seed=3)
    assert table.ids == ["p02", "p03", "p04"]
    assert failed == {"p99": f"{gone['p99']}: expected a volume file, received No such file or "
                             "directory"}


def test_an_exact_duplicate_is_its_twins_nearest_neighbour(cohort, tmp_path, caplog):
    """Found in review: the patches were seeded by the id, so one scan preprocessed under two
    ids (a common cohort error) gave two embeddings no nearer than other patients'. (And, found
    by a user's trial, --labels of another cohort passed without a word.)"""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(cohort / "data", data)
    shutil.copy(data / "p03.h5", data / "twin_of_p03.h5")
    out = tmp_path / "out"
    (tmp_path / "other.csv").write_text("id,cancer\nq1,0\nq2,1\n")
    run = tmp_path / "gmcae_run"  # train-gmcae's RUN_DIR does for its model (a user's trial)
    run.mkdir()
    shutil.copy(cohort / "gmcae.keras", run / "gmcae.keras")
    with caplog.at_level(logging.WARNING):
        assert main(["embed", str(data), str(run), str(out), "--patches", "8",
                     "--neighbours", "2", "--labels", str(tmp_path / "other.csv")]) == 0
    assert f"--labels {tmp_path / 'other.csv'} names none of the 10 patients of {data}" \
        in caplog.text
    first = {}  # each patient's nearest neighbour: its first row
    for row in _rows(out / "neighbours.csv"):
        first.setdefault(row["id"], (row["neighbour"], float(row["distance"])))
    assert len(first) == ORDINARY + 3
    assert first["p03"] == ("twin_of_p03", 0.0) and first["twin_of_p03"] == ("p03", 0.0)
    assert all(distance > 0 for neighbour, distance in first.values()
               if neighbour not in ("p03", "twin_of_p03"))


def test_neighbours_and_outlier_scores_against_a_brute_force_reference():
    """Found in review: only their order and count were checked."""
    from kdsb.evaluation.embed import CohortEmbedding, nearest_patients, outlier_scores

    rng = np.random.default_rng(4)
    # Features of very different scales: without the standardisation the last would decide.
    embeddings = rng.normal(size=(9, 5)) * np.array([1, 2, 0.5, 1, 1000])
    nll = rng.normal(size=(9, 3))
    table = CohortEmbedding([f"p{i}" for i in range(9)], embeddings, nll)

    z = (embeddings - embeddings.mean(0)) / embeddings.std(0)
    distance = np.linalg.norm(z[:, None] - z[None], axis=-1)
    np.fill_diagonal(distance, np.inf)
    order = np.argsort(distance, axis=1)[:, :3]
    expected = [(f"p{i}", f"p{j}", distance[i, j]) for i in range(9) for j in order[i]]
    rows = nearest_patients(table, 3)
    assert [r[:2] for r in rows] == [e[:2] for e in expected]
    np.testing.assert_allclose([r[2] for r in rows], [e[2] for e in expected], rtol=1e-9)

    isolation = np.sort(distance, axis=1)[:, :3].mean(1)
    top = nll[:, 2]
    reference = ((isolation - isolation.mean()) / isolation.std()
                 + (top - top.mean()) / top.std()) / 2
    np.testing.assert_allclose(outlier_scores(table, 3), reference, rtol=1e-9)
