"""Tests of the attention-MIL head (kdsb.models.mil) and its bags (kdsb.training.bags)."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def encoder():
    import keras

    from kdsb.models.gmcae import build_gmcae, encoder_of

    keras.utils.set_random_seed(0)
    return encoder_of(build_gmcae(patch_size=16, width=2, mixtures=2))


@pytest.mark.parametrize("pooling", ["attention", "max"])
def test_padding_does_not_change_the_pooled_bag(pooling):
    from kdsb.models.mil import AttentionMILPooling

    rng = np.random.default_rng(0)
    layer = AttentionMILPooling(4, pooling)
    bag = rng.normal(size=(1, 5, 3)).astype("float32")
    padded = np.concatenate([bag, rng.normal(size=(1, 4, 3)).astype("float32") * 100], axis=1)
    mask = np.r_[np.ones(5), np.zeros(4)][None].astype("float32")
    alone = np.asarray(layer(bag))
    np.testing.assert_allclose(np.asarray(layer(padded, mask=mask)), alone, rtol=1e-5, atol=1e-6)
    if pooling == "max":
        np.testing.assert_allclose(alone, bag.max(axis=1))
    else:  # a convex combination of the instances
        weights = np.asarray(layer.attention(bag))
        assert weights.shape == (1, 5) and weights.sum() == pytest.approx(1.0, rel=1e-5)
        np.testing.assert_allclose(alone, (weights[..., None] * bag).sum(1), rtol=1e-5)


def test_attention_pools_in_float32_under_mixed_float16(encoder):
    """Found in review: in float16 the attention weights of a large bag (~1/n) were flushed to
    0 and the pooled vector shrank with the bag's size."""
    import keras

    from kdsb.models.mil import build_mil_classifier

    channels = int(encoder.output.shape[-1])
    try:
        keras.config.set_dtype_policy("mixed_float16")
        _, head = build_mil_classifier(encoder, feature_mean=np.zeros(channels),
                                       feature_variance=np.ones(channels), units=4,
                                       attention_units=4, pooling="attention", dropout=0.0)
    finally:
        keras.config.set_dtype_policy("float32")
    pool = head.get_layer("mil_pooling")
    assert pool.compute_dtype == "float32"
    instances = np.ones((1, 60_000, 4), np.float32)  # one value: any weights average to it
    np.testing.assert_allclose(np.asarray(pool(instances)), 1.0, rtol=1e-3)


@pytest.mark.parametrize("units", [0, -3, 2.5, float("inf"), float("nan"), True])
def test_attention_units_must_be_a_positive_whole_number(units):
    from kdsb.models.mil import AttentionMILPooling

    with pytest.raises(ValueError, match="attention_units of at least 1"):
        AttentionMILPooling(units)
    assert AttentionMILPooling(16.0).attention_units == 16  # as a saved config may hold it


def test_the_classifier_equals_encoder_cells_through_the_head(encoder, tmp_path):
    import keras

    from kdsb.models.mil import build_mil_classifier, encoder_instances, truncated_encoder

    channels = int(truncated_encoder(encoder, 2).output.shape[-1])
    classifier, head = build_mil_classifier(
        encoder_instances(encoder, 2), feature_mean=np.zeros(channels),
        feature_variance=np.ones(channels), units=4, pooling="attention", dropout=0.25,
    )
    x = np.random.default_rng(2).normal(size=(1, 16, 12, 20, 1)).astype("float32")
    cells = np.asarray(truncated_encoder(encoder, 2)(x))
    assert cells.shape == (1, 4, 3, 5, channels)
    instances = cells.reshape(1, -1, channels)
    p_head = float(head([instances, np.ones(instances.shape[:2], "float32")])[0, 0])
    assert float(classifier(x)[0, 0]) == pytest.approx(p_head, rel=1e-5)
    assert all(not w.trainable for w in classifier.get_layer("encoder").weights)
    classifier.save(tmp_path / "c.keras")
    loaded = keras.saving.load_model(tmp_path / "c.keras", safe_mode=True, compile=False)
    assert float(loaded(x)[0, 0]) == pytest.approx(p_head, rel=1e-5)


def test_bags_are_cached_keyed_and_streamed_padded(tmp_path):
    from kdsb.data.inputs import VolumeInput
    from kdsb.io.volumes import volume_path, write_volume
    from kdsb.models.gmcae import build_gmcae
    from kdsb.training.bags import bag_dataset, encode_bags, feature_statistics

    gmcae = tmp_path / "g.keras"
    build_gmcae(patch_size=16, width=2, mixtures=2).save(gmcae)
    volumes = {}
    for i, shape in enumerate([(16, 16, 16), (24, 16, 16)]):
        volumes[f"p{i}"] = volume_path(tmp_path / "data", f"p{i}")
        hu = np.random.default_rng(i).integers(-1000, 200, shape)
        write_volume(volumes[f"p{i}"], hu, np.ones(shape), (1, 1, 1), (0, 0, 0))
    vi = VolumeInput(spacing_mm=(1, 1, 1))
    files = encode_bags(volumes, gmcae, vi, [0, 5], tmp_path / "bags", head="mil", block=2)
    bag = np.load(files["p1"])
    assert bag.shape == (2, 6 * 4 * 4, 4) and bag.dtype == np.float16
    # Each row is the encoder's block-2 cells of the volume as read, under that symmetry.
    from kdsb.data.patches import apply_symmetry
    from kdsb.models.classifier import load_encoder_from_gmcae
    from kdsb.models.mil import truncated_encoder

    cells = truncated_encoder(load_encoder_from_gmcae(gmcae), 2)
    x = vi.read(volumes["p1"])
    for row, symmetry in zip(bag, [0, 5], strict=True):
        expected = np.asarray(cells(apply_symmetry(x, symmetry)[np.newaxis]))
        np.testing.assert_allclose(row, expected.reshape(-1, 4), rtol=2e-3, atol=2e-3)
    assert not np.allclose(bag[0], bag[1], atol=1e-3)
    stamp = files["p0"].stat().st_mtime_ns
    assert encode_bags(volumes, gmcae, vi, [0, 5], tmp_path / "bags", head="mil", block=2) == files
    assert files["p0"].stat().st_mtime_ns == stamp  # reused, not recomputed
    # A bag damaged from outside (a copy cut short) is computed again (found by a user's check:
    # a traceback from NumPy's memory map).
    whole = files["p1"].read_bytes()
    files["p1"].write_bytes(whole[:1000])
    assert encode_bags(volumes, gmcae, vi, [0, 5], tmp_path / "bags", head="mil", block=2) == files
    assert files["p1"].read_bytes() == whole
    # Another precision is another key (found in review: bfloat16 bags reused by a float32 run).
    import keras

    try:
        keras.config.set_dtype_policy("mixed_bfloat16")
        other = encode_bags(volumes, gmcae, vi, [0, 5], tmp_path / "bags", head="mil", block=2)
    finally:
        keras.config.set_dtype_policy("float32")
    assert other["p0"] != files["p0"]
    assert encode_bags(volumes, gmcae, vi, [0, 5], tmp_path / "bags", head="mil", block=2) == files
    # Another block is another key; the stale bag of the same patient is removed.
    other = encode_bags(volumes, gmcae, vi, [0, 5], tmp_path / "bags", head="mil", block=1)
    assert other["p0"] != files["p0"] and not files["p0"].exists()
    assert sorted(p.name for p in (tmp_path / "bags").iterdir()) == sorted(
        f.name for f in other.values())
    mean, variance = feature_statistics(list(other.values()))
    first = np.concatenate([np.load(f)[0].astype(np.float64) for f in other.values()])
    np.testing.assert_allclose(mean, first.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(variance, first.var(0), rtol=1e-3, atol=1e-6)
    (x, mask), y = next(iter(bag_dataset(list(other.values()), [0, 1], batch_size=2)))
    assert x.shape[0] == 2 and x.shape[1] == 12 * 8 * 8
    np.testing.assert_array_equal(np.asarray(mask).sum(1), [8 * 8 * 8, 12 * 8 * 8])
    np.testing.assert_array_equal(np.asarray(y)[:, 0], [0, 1])
