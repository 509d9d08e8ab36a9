"""The one image transform: decode, orientation, colour layouts, resize policies, enhancements."""

from __future__ import annotations

import dataclasses

import cv2
import images
import numpy as np
import pytest

from imageiq_spark.vision.decode import ImageDecodeError, jpeg_size, reduction_factor
from imageiq_spark.vision.spec import TransformSpec
from imageiq_spark.vision.transform import prepare_batch, prepare_image

RED, BLUE = images.RED, images.BLUE


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# ------------------------------------------------------------------------------------ spec


def test_spec_round_trips_through_a_json_safe_dict():
    spec = TransformSpec(size=(24, 48), color="gray", resize="letterbox", enhance=("gamma", "clahe"),
                         gamma=2.2, pad_value=9)
    data = spec.to_dict()
    assert data["size"] == [24, 48] and data["enhance"] == ["gamma", "clahe"]
    assert TransformSpec.from_dict(data) == spec
    assert TransformSpec.from_dict(data).version == spec.version


def test_version_is_stable_across_processes_and_names_every_parameter():
    # Pinned: the default spec's hash must not drift, or every table would be re-prepared.
    assert TransformSpec().version == "6d6207988774"
    base = TransformSpec(enhance=("clahe", "denoise", "unsharp", "white_balance", "gamma"),
                         resize="letterbox")
    changes = {"size": (33, 32), "color": "gray", "resize": "stretch", "enhance": ("gamma",),
               "clahe_clip_limit": 3.0, "clahe_tile_grid": 4, "denoise_strength": 9.0,
               "unsharp_amount": 0.5, "unsharp_sigma": 2.0, "gamma": 1.5, "pad_value": 1,
               "reduced_decode": False}
    assert set(changes) == {f.name for f in dataclasses.fields(TransformSpec)}
    versions = {dataclasses.replace(base, **{k: v}).version for k, v in changes.items()}
    assert len(versions) == len(changes) and base.version not in versions


def test_parameters_of_unused_operators_do_not_change_the_version():
    assert TransformSpec(gamma=2.0, clahe_clip_limit=9.0).version == TransformSpec().version
    assert TransformSpec(enhance=("gamma",), gamma=2.0).version != TransformSpec(enhance=("gamma",)).version


def test_spec_from_config_takes_size_from_the_model_default(config):
    spec = TransformSpec.from_config(config)
    assert spec.size == config.image_size == (32, 32)
    assert spec.channels == 3 and spec.shape == (32, 32, 3)


def test_invalid_spec_names_the_parameter():
    with pytest.raises(ValueError, match="resize expects one of"):
        TransformSpec(resize="squash")
    with pytest.raises(ValueError, match="enhance expects operators"):
        TransformSpec(enhance=("sharpen",))


# ------------------------------------------------------------------------------ resize policies


def test_stretch_fills_the_target_ignoring_aspect():
    out = prepare_image(images.png(images.halves(20, 40)), TransformSpec(size=(10, 10)))
    assert out.shape == (10, 10, 3) and out.flags.c_contiguous and out.dtype == np.uint8
    assert (out[:, :5] == RED).all() and (out[:, 5:] == BLUE).all()


def test_letterbox_keeps_aspect_and_pads_with_pad_value():
    spec = TransformSpec(size=(20, 20), resize="letterbox", pad_value=7)
    out = prepare_image(images.png(images.halves(20, 40)), spec)
    assert out.shape == (20, 20, 3)
    assert (out[:5] == 7).all() and (out[15:] == 7).all()  # 20x40 -> 10x20 centred
    assert (out[5:15, :10] == RED).all() and (out[5:15, 10:] == BLUE).all()


def test_center_crop_keeps_aspect_and_cuts_the_middle():
    # 20x40: left quarter red, middle half green, right quarter blue -> the crop is all green.
    scene = np.zeros((20, 40, 3), np.uint8)
    scene[:, :10], scene[:, 10:30], scene[:, 30:] = RED, images.GREEN, BLUE
    out = prepare_image(images.png(scene), TransformSpec(size=(10, 10), resize="center_crop"))
    assert out.shape == (10, 10, 3) and (out == images.GREEN).all()


def test_upscaling_a_digit_keeps_its_grey_levels():
    digit = np.zeros((28, 28), np.uint8)
    digit[4:24, 12:16] = 255
    out = prepare_image(images.gray_png(digit), TransformSpec(size=(56, 56), color="gray"))
    assert out.shape == (56, 56, 1)
    assert out[:, :, 0].max() == 255 and out[:6].max() == 0 and (out[12:44, 26:30] == 255).all()



def plain_resize(data: bytes, size: tuple[int, int], interpolation: int = cv2.INTER_AREA) -> np.ndarray:
    """The textbook path the transform is held to: full decode, OpenCV resize (exact INTER_AREA), RGB."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return cv2.cvtColor(cv2.resize(image, size[::-1], interpolation=interpolation), cv2.COLOR_BGR2RGB)


@pytest.mark.parametrize(
    ("stored", "size"),
    [((250, 300), (224, 224)), ((375, 500), (224, 224)), ((750, 1000), (224, 224)),
     ((480, 640), (32, 32)), ((375, 500), (160, 200))],
)
def test_shrinking_stays_within_a_grey_level_of_exact_area_averaging(stored, size):
    data = images.png(images.camera_scene(*stored))
    out = prepare_image(data, TransformSpec(size=size))
    exact = plain_resize(data, size)
    assert out.shape == (*size, 3)
    assert mean_abs_diff(out, exact) < 1.0
    # The check can fail: plain bilinear sampling (no area averaging) is further off.
    bilinear = plain_resize(data, size, cv2.INTER_LINEAR)
    assert mean_abs_diff(bilinear, exact) > mean_abs_diff(out, exact)


# ------------------------------------------------------------------------------ colour layouts


def test_gray_png_becomes_three_equal_channels():
    gray = np.full((8, 8), 77, np.uint8)
    out = prepare_image(images.gray_png(gray), TransformSpec(size=(8, 8)))
    assert (out == 77).all() and out.shape == (8, 8, 3)


def test_rgba_png_is_composited_over_white():
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[:, :2] = (255, 0, 0, 255)  # opaque red stays red
    rgba[:, 2:4] = (0, 0, 255, 0)  # transparent shows the white page
    rgba[:, 4:] = (0, 0, 0, 128)  # half-transparent black is mid grey
    out = prepare_image(images.rgba_png(rgba), TransformSpec(size=(4, 6)))
    assert (out[:, :2] == RED).all()
    assert (out[:, 2:4] == 255).all()
    assert (out[:, 4:] == 127).all()


def test_16_bit_png_maps_full_range_onto_8_bits():
    samples = np.array([[0, 257 * 100, 65535, 257 * 200]], np.uint16).repeat(2, axis=0)
    out = prepare_image(images.png16(samples), TransformSpec(size=(2, 4)))
    assert out[0, :, 0].tolist() == [0, 100, 255, 200]
    rgb16 = (images.quadrants(4, 4).astype(np.uint16) * 257)
    out = prepare_image(images.png16(rgb16), TransformSpec(size=(4, 4)))
    assert (out == images.quadrants(4, 4)).all()  # RGB order kept through the 16-bit path


def test_cmyk_jpeg_comes_out_as_the_rgb_it_was_made_from():
    scene = images.quadrants(32, 32)
    out = prepare_image(images.cmyk_jpeg(scene), TransformSpec(size=(32, 32)))
    # Compare the quadrant centres, away from JPEG's chroma-subsampling edges.
    for y, x in ((8, 8), (8, 24), (24, 8), (24, 24)):
        assert np.abs(out[y, x].astype(int) - scene[y, x]).max() <= 6, (y, x, out[y, x], scene[y, x])


@pytest.mark.parametrize("encoder", [images.png, images.bmp, images.tiff, images.webp_lossless, images.gif])
def test_lossless_containers_decode_to_the_same_pixels(encoder):
    scene = images.quadrants()
    assert (prepare_image(encoder(scene), TransformSpec(size=(40, 60))) == scene).all()


def test_gray_output_uses_luminance():
    out = prepare_image(images.png(images.quadrants(8, 8)), TransformSpec(size=(8, 8), color="gray"))
    assert out.shape == (8, 8, 1)
    assert out[0, 0, 0] == 76  # 0.299 * 255 for pure red
    assert out[0, 7, 0] == round(0.587 * 200)


# --------------------------------------------------------------------------------- orientation


def test_exif_rotated_jpeg_prepares_equal_to_its_upright_twin():
    upright = images.camera_scene(120, 160)
    spec = TransformSpec(size=(60, 80))
    straight = prepare_image(images.jpeg(upright), spec)
    rotated = prepare_image(images.exif_rotated_jpeg(upright), spec)
    assert rotated.shape == straight.shape == (60, 80, 3)
    assert mean_abs_diff(rotated, straight) < 2.0
    # The check can fail: the stored (unrotated) pixels are far from the upright ones.
    unrotated = cv2.resize(np.rot90(upright), (80, 60), interpolation=cv2.INTER_AREA)
    assert mean_abs_diff(unrotated, straight) > 20


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "WEBP"])
def test_exif_orientation_is_applied_beyond_jpeg(fmt):
    from PIL import Image

    upright = images.quadrants()
    exif = Image.Exif()
    exif[0x0112] = 6
    extra = {"lossless": True} if fmt == "WEBP" else {}
    data = images.encode(np.ascontiguousarray(np.rot90(upright)), fmt, exif=exif.tobytes(), **extra)
    assert (prepare_image(data, TransformSpec(size=(40, 60))) == upright).all()


# -------------------------------------------------------------------------------- enhancements


def test_clahe_raises_local_contrast_on_luminance_only():
    rng = np.random.default_rng(1)
    flat = np.clip(120 + rng.normal(0, 4, (64, 64)), 0, 255).astype(np.uint8)
    scene = np.stack([flat, flat, flat], axis=-1)
    spec = TransformSpec(size=(64, 64), enhance=("clahe",), clahe_clip_limit=4.0)
    out = prepare_image(images.png(scene), spec)
    assert out[:, :, 0].std() > 2 * scene[:, :, 0].std()
    assert np.ptp(out.astype(int), axis=2).max() <= 2  # still gray: no hue shift


def test_denoise_moves_a_noisy_image_towards_the_clean_one():
    clean = images.halves(48, 48, left=(60, 60, 60), right=(190, 190, 190))
    rng = np.random.default_rng(2)
    noisy = np.clip(clean + rng.normal(0, 12, clean.shape), 0, 255).astype(np.uint8)
    out = prepare_image(images.png(noisy), TransformSpec(size=(48, 48), enhance=("denoise",),
                                                         denoise_strength=15.0))
    assert mean_abs_diff(out, clean) < 0.5 * mean_abs_diff(noisy, clean)


def test_unsharp_mask_steepens_edges_and_leaves_flat_areas():
    soft = cv2.GaussianBlur(images.halves(32, 32, left=(50, 50, 50), right=(200, 200, 200)), (0, 0), 2)
    out = prepare_image(images.png(soft), TransformSpec(size=(32, 32), enhance=("unsharp",)))
    edge_before = int(soft[16, 17, 0]) - int(soft[16, 14, 0])
    edge_after = int(out[16, 17, 0]) - int(out[16, 14, 0])
    assert edge_after > edge_before
    assert (out[:, :4] == soft[:, :4]).all() and (out[:, -4:] == soft[:, -4:]).all()


def test_gray_world_white_balance_equalises_channel_means():
    rng = np.random.default_rng(3)
    base = rng.integers(40, 160, (32, 32, 1)).astype(np.float32)
    cast = np.clip(base * np.array([1.5, 1.0, 0.6], np.float32), 0, 255).astype(np.uint8)
    out = prepare_image(images.png(cast), TransformSpec(size=(32, 32), enhance=("white_balance",)))
    means = out.reshape(-1, 3).mean(axis=0)
    assert np.ptp(means) < 1.0 < np.ptp(cast.reshape(-1, 3).mean(axis=0))


def test_gamma_brightens_mid_tones_by_the_power_law():
    gray = np.array([[0, 64, 128, 255]], np.uint8)
    out = prepare_image(images.gray_png(gray), TransformSpec(size=(1, 4), color="gray",
                                                            enhance=("gamma",), gamma=2.0))
    assert out[0, :, 0].tolist() == [0, 128, 181, 255]  # 255 * (v / 255) ** 0.5


def test_enhancements_apply_in_the_order_listed():
    scene = images.camera_scene(32, 32)
    data = images.png(scene)

    def prepared(*operators: str) -> np.ndarray:
        return prepare_image(data, TransformSpec(size=(32, 32), enhance=operators, gamma=2.0))

    wb_then_gamma = prepared("white_balance", "gamma")
    gamma_after_wb = prepare_image(images.png(prepared("white_balance")),
                                   TransformSpec(size=(32, 32), enhance=("gamma",), gamma=2.0))
    assert (wb_then_gamma == gamma_after_wb).all()
    assert not (wb_then_gamma == prepared("gamma", "white_balance")).all()


# ----------------------------------------------------------------------------- reduced decode


def test_reduction_factor_keeps_twice_the_target_on_each_side():
    spec = TransformSpec(size=(224, 224))
    assert reduction_factor((375, 500), spec) == 1
    assert reduction_factor((3000, 4000), spec) == 4  # 750x1000 >= 448 on each side; 1/8 is not
    assert reduction_factor((28, 28), TransformSpec()) == 1
    assert reduction_factor((3000, 4000), dataclasses.replace(spec, reduced_decode=False)) == 1


def test_reduced_jpeg_decode_stays_within_two_grey_levels_of_the_full_decode():
    data = images.jpeg(images.camera_scene(3000, 4000), quality=90)
    assert jpeg_size(data) == (3000, 4000)
    spec = TransformSpec(size=(224, 224))
    reduced = prepare_image(data, spec)
    full = prepare_image(data, dataclasses.replace(spec, reduced_decode=False))
    assert reduced.shape == full.shape == (224, 224, 3)
    assert mean_abs_diff(reduced, full) < 2.0
    # ... and of the plain loop's full decode with OpenCV's exact area averaging.
    assert mean_abs_diff(reduced, plain_resize(data, (224, 224))) < 2.0


# ---------------------------------------------------------------------------------- failures


def test_undecodable_bytes_raise_image_decode_error_with_a_reason():
    with pytest.raises(ImageDecodeError) as caught:
        prepare_image(b"this is not an image", TransformSpec())
    assert caught.value.reason == "decode_failed"
    with pytest.raises(ImageDecodeError) as caught:
        prepare_image(b"", TransformSpec())
    assert caught.value.reason == "empty"


def test_prepare_batch_stacks_good_images_and_reports_failures_by_index():
    spec = TransformSpec(size=(8, 8))
    good = images.png(images.halves(8, 8))
    tensors, failures = prepare_batch([good, b"junk", good], spec)
    assert tensors.shape == (2, 8, 8, 3)
    assert (tensors[0] == prepare_image(good, spec)).all() and (tensors[1] == tensors[0]).all()
    assert [(i, e.reason) for i, e in failures] == [(1, "decode_failed")]
