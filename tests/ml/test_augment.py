"""Training augmentation changes pixels as configured, and only as configured."""

from __future__ import annotations

import images
import numpy as np
import tensorflow as tf

from imageiq_spark.core.config_sections import AugmentConfig
from imageiq_spark.ml.readers import augmenter

# Four mid-tone colours (64..191): any mirror moves them, a brightness shift of up to 51 clips none.
PICTURE = images.quadrants(16, 16) // 2 + 64
BATCH = np.repeat(PICTURE[None], 32, axis=0)


def augmented(augment: AugmentConfig) -> np.ndarray:
    out, _ = augmenter(augment, PICTURE.shape, seed=3)(tf.constant(BATCH), tf.zeros(len(BATCH)))
    return out.numpy()


def test_flip_mirrors_some_images_left_right_and_leaves_the_others_as_they_were():
    out = augmented(AugmentConfig(flip=True))

    mirrored = [bool(np.array_equal(image, PICTURE[:, ::-1])) for image in out]
    unchanged = [bool(np.array_equal(image, PICTURE)) for image in out]
    assert all(m or u for m, u in zip(mirrored, unchanged))
    assert 0 < sum(mirrored) < len(out)


def test_brightness_shifts_each_image_by_at_most_the_configured_share_of_the_range():
    out = augmented(AugmentConfig(brightness=0.2)).astype(np.int16)

    per_image = (out - PICTURE.astype(np.int16)).reshape(len(out), -1)
    assert np.all(per_image.max(axis=1) - per_image.min(axis=1) <= 1)  # one shift per image
    assert np.abs(per_image).max() <= round(0.2 * 255) and np.abs(per_image).max() > 0
    assert len({int(round(s.mean())) for s in per_image}) > 1  # drawn per image


def test_no_augmentation_configured_leaves_every_pixel():
    out = augmented(AugmentConfig())

    np.testing.assert_array_equal(out, BATCH)
