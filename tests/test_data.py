"""Tests of data.py: synthetic scenes, ImageFolder decoding and bad files, ADE20K, Fashion-MNIST
(IDX files written here, and the real files where installed), collate.

Each test compares against an independent fact: a supersampled or re-rendered scene, a fresh
Python process, Pillow's own resize + crop, images whose content is known by construction.
"""
import gzip
import hashlib
import io
import os
import math
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import data

MEAN, STD = np.array(data.IMAGENET_MEAN), np.array(data.IMAGENET_STD)


def normalised(rgb) -> np.ndarray:
    """ImageNet normalisation of an 8-bit colour, computed here independently: (3,)."""
    return (np.asarray(rgb, np.float64) / 255 - MEAN) / STD


# ----------------------------------------------------------------------------------------------
# Synthetic scenes
# ----------------------------------------------------------------------------------------------

def test_synthetic_deterministic_and_distinct():
    a, b = data.render_scene(5, 64), data.render_scene(5, 64)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask) and a.label == b.label
    c = data.render_scene(6, 64)
    assert np.abs(a.image - c.image).mean() > 0.05
    val = data.render_scene(5, 64, split="val")
    assert np.abs(a.image - val.image).mean() > 0.05
    ds = data.SyntheticScenes(10, 64)
    x, y = ds[5], ds[5]
    assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
    assert x["image"].shape == (3, 64, 64) and x["image"].dtype == torch.float32
    assert x["mask"].shape == (64, 64) and x["mask"].dtype == torch.int64
    assert x["label"].dtype == torch.int64 and x["label"].shape == () and x["index"] == 5
    # The item is the scene normalised with the ImageNet statistics.
    expect = (a.image.astype(np.float64) - MEAN) / STD
    assert np.allclose(x["image"].permute(1, 2, 0).numpy(), expect, atol=1e-5)


def _digest(n: int, size: int) -> str:
    h = hashlib.sha256()
    for i in range(n):
        s = data.render_scene(i, size, seed=3)
        h.update(s.image.tobytes() + s.mask.tobytes() + bytes([s.label]))
    return h.hexdigest()


def test_synthetic_same_in_a_fresh_process_and_in_workers():
    code = "import sys; sys.path[:0] = ['.', 'tests']; from test_data import _digest; print(_digest(4, 40))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(data.__file__).parent)
    assert out.stdout.strip() == _digest(4, 40)
    ds = data.SyntheticScenes(12, 32, seed=3)
    batches = {w: list(DataLoader(ds, batch_size=5, num_workers=w, collate_fn=data.collate))
               for w in (0, 2)}
    for b0, b2 in zip(batches[0], batches[2]):
        for k in ("image", "mask", "label", "index", "target"):
            assert torch.equal(b0[k], b2[k]), k


def _area_pool(x: np.ndarray, k: int) -> np.ndarray:
    H, W = x.shape[:2]
    return x.reshape(H // k, k, W // k, k, *x.shape[2:]).mean((1, 3))


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_synthetic_resolution_independent(index):
    """A 4x render, area-pooled 4x4, is the 1x render (pixels are area means of one scene)."""
    small, large = data.render_scene(index, 64), data.render_scene(index, 256)
    err = np.abs(_area_pool(large.image.astype(np.float64), 4) - small.image)
    assert err.mean() < 4e-3 and np.quantile(err, 0.99) < 0.1
    # Masks: the majority label of each 4x4 block agrees with the small render almost everywhere.
    blocks = large.mask.reshape(64, 4, 64, 4).transpose(0, 2, 1, 3).reshape(64, 64, 16)
    majority = np.apply_along_axis(lambda v: np.bincount(v).argmax(), 2, blocks)
    assert (majority == small.mask).mean() > 0.98
    assert small.label == large.label and np.array_equal(small.target, large.target)


def test_synthetic_window_is_a_crop_of_the_larger_render():
    """The top-left quadrant rendered at S is exactly the top-left of the whole scene at 2S."""
    whole = data.render_scene(7, 96)
    quadrant = data.render_scene(7, 48, window=(-1.0, -1.0, 0.0, 0.0))
    assert np.abs(whole.image[:48, :48] - quadrant.image).max() < 1e-4
    assert (whole.mask[:48, :48] == quadrant.mask).mean() > 0.999


def test_grating_pixels_are_area_means():
    """The analytic box mean of the gratings matches a 32x32 supersampled mean of the cosines."""
    rng = np.random.default_rng(0)
    f, phase, amp = rng.normal(0, 20, (4, 2)), rng.uniform(0, 6.3, 4), rng.normal(0, 1, (4, 3))
    n, sub, h = 8, 32, 2 / 8
    ys = xs = (np.arange(n) + 0.5) * h - 1
    got = data._gratings(ys.astype(np.float32), xs.astype(np.float32), h, h, f, phase, amp)
    fine = (np.arange(n * sub) + 0.5) * (h / sub) - 1
    arg = 2 * np.pi * (f[:, 0, None, None] * fine[None, :, None] + f[:, 1, None, None] * fine[None, None, :])
    dense = np.einsum("khw,kc->chw", np.cos(arg + phase[:, None, None]), amp)
    want = dense.reshape(3, n, sub, n, sub).mean((2, 4))
    assert np.abs(got - want).max() < 2e-3


def test_glyphs_have_equal_ink():
    """Only the label changes: the badge's mean colour is the same for every glyph, at a sharp
    (128 px) and at coarse (8 px, 4 px) renders of the window around it."""
    p = data.sample_scene(0, num_classes=len(data.GLYPHS))
    t = p["target"]
    window = (t["cy"] - t["r"], t["cx"] - t["r"], t["cy"] + t["r"], t["cx"] + t["r"])
    k = np.argmax(np.abs(t["ink"] - t["fill"]))                       # most contrasted channel
    for px in (128, 8, 4):
        means = []
        for c in range(len(data.GLYPHS)):
            p["label"] = c
            means.append(data.render_params(p, px, window).image[..., k].mean())
        assert np.ptp(means) / abs(t["ink"][k] - t["fill"][k]) < 0.006


def test_synthetic_labels_in_range_and_balanced():
    labels = np.array([data.sample_scene(i)["label"] for i in range(3000)])
    counts = np.bincount(labels, minlength=10)
    assert labels.min() >= 0 and labels.max() < 10 and len(counts) == 10
    assert counts.min() > 300 * 0.75 and counts.max() < 300 * 1.25      # binomial sd ~16 around 300
    labels4 = {data.sample_scene(i, num_classes=4)["label"] for i in range(200)}
    assert labels4 == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="num_classes"):
        data.SyntheticScenes(10, 32, num_classes=len(data.GLYPHS) + 1)


def test_the_largest_badge_fits_and_a_larger_one_is_refused():
    """A badge of diameter 1 / 1.1 of the side just fits with its margin, at every index; one
    larger (or an empty range) is refused with the rule, not numpy's "high - low < 0"."""
    for i in range(50):
        t = data.sample_scene(i, target_size=(data.TARGET_MAX, data.TARGET_MAX))["target"]
        assert max(abs(t["cy"]), abs(t["cx"])) + 1.1 * t["r"] <= 1 + 1e-9
    for bad in ((0.8, 0.95), (0.5, 0.4), (0.0, 0.1)):
        with pytest.raises(ValueError, match="0 < min <= max <= 0.909"):
            data.SyntheticScenes(10, 32, target_size=bad)


def test_synthetic_mask_holds_the_label_target():
    for i in range(16):
        s = data.render_scene(i, 96)
        target = data.TARGET_SEGMENT + s.label
        assert 0 <= s.mask.min() and s.mask.max() < data.num_segment_classes(10)
        assert set(np.unique(s.mask[s.mask >= data.TARGET_SEGMENT])) == {target}
        cy, cx, r = s.target
        assert s.mask[int((cy + 1) / 2 * 96), int((cx + 1) / 2 * 96)] == target
        # The badge is a disc of radius r in a scene of side 2, drawn on top of everything:
        # its pixel count is pi r^2 / 4 of the image, up to the edge pixels.
        area, expect = (s.mask == target).sum(), math.pi * r ** 2 / 4 * 96 ** 2
        assert abs(area - expect) < 2 * math.pi * r / 2 * 96 + 4
        assert 0.06 <= 2 * r / 2 <= 0.12       # diameter as a fraction of the side
        assert -1 < cy - r and cy + r < 1 and -1 < cx - r and cx + r < 1


def _outside(size: int, target, margin: float) -> np.ndarray:
    """(size, size) bool: pixels whose centre lies outside the target's disc (radius + margin)."""
    c = (np.arange(size) + 0.5) / size * 2 - 1
    cy, cx, r = (float(v) for v in target)
    return (c[:, None] - cy) ** 2 + (c[None, :] - cx) ** 2 > (r + margin) ** 2


def test_synthetic_swapped_scene_changes_only_the_glyph():
    """`swapped(i)`: another class's glyph in the same badge; every pixel away from the badge
    as drawn, and the scene as drawn again afterwards."""
    ds = data.SyntheticScenes(20, 64, 10, split="val", target_size=(0.35, 0.5))
    labels = set()
    for i in range(20):
        a, b = ds[i], ds.swapped(i)
        assert b["label"] != a["label"] and torch.equal(b["target"], a["target"])
        labels.add(int(b["label"]))
        away = torch.from_numpy(_outside(64, a["target"], 2 / 64 * 1.5))
        assert torch.equal(a["image"][:, away], b["image"][:, away])
        assert (a["image"] - b["image"]).abs().amax() > 0.3                 # the glyph did change
        assert torch.equal(ds.swapped(i)["image"], b["image"]) and torch.equal(ds[i]["image"], a["image"])
    assert len(labels) >= 8
    with pytest.raises(ValueError, match="2 classes"):
        data.SyntheticScenes(4, 32, 1).swapped(0)


def test_fashion_swapped_scene_changes_only_the_item():
    """`swapped(i)`: an item of another class in the same square, the fragments unchanged."""
    images, labels = _fashion_items()
    ds = data.FashionMNISTScenes(images, labels, 40, 64, "cluttered", **data.OBJECT_CENTRIC)
    for i in range(10):
        a, b = ds[i], ds.swapped(i)
        assert b["label"] != a["label"] and torch.equal(b["target"], a["target"])
        cy, cx, h = a["target"].tolist()
        c = (torch.arange(64) + 0.5) / 64 * 2 - 1
        away = ((c[:, None] - cy).abs() > h + 2 / 64) | ((c[None, :] - cx).abs() > h + 2 / 64)
        assert torch.equal(a["image"][:, away], b["image"][:, away])
        assert (a["image"] - b["image"]).abs().amax() > 0.3
        assert torch.equal(ds.swapped(i)["image"], b["image"])


def test_synthetic_non_square():
    s = data.render_scene(2, (40, 72))
    assert s.image.shape == (40, 72, 3) and s.mask.shape == (40, 72)
    assert data.SyntheticScenes(3, (40, 72))[1]["image"].shape == (3, 40, 72)


# ----------------------------------------------------------------------------------------------
# ImageFolder
# ----------------------------------------------------------------------------------------------

def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _bomb_png(side: int) -> bytes:
    """A PNG header claiming side x side grey pixels (beyond Pillow's decompression-bomb limit)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * (side + 1))) + _png_chunk(b"IEND", b""))


def _jpeg_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """root/{cat,dog,zebra}/...: valid images of every mode (expected colour, or None when the
    content is not constant), broken files, and ignored non-image files."""
    root = tmp_path_factory.mktemp("folder")
    for c in ("zebra", "cat", "dog"):
        (root / c).mkdir()
    valid = {}

    def put(rel, im, colour, **kw):
        im.save(root / rel, **kw)
        valid[str(root / rel)] = colour

    put("cat/rgb.png", Image.new("RGB", (40, 30), (10, 200, 30)), (10, 200, 30))
    put("cat/grey.png", Image.new("L", (30, 40), 100), (100, 100, 100))
    put("cat/rgba_clear.png", Image.new("RGBA", (20, 20), (0, 0, 255, 0)), data.ALPHA_BACKGROUND)
    put("cat/rgba_opaque.png", Image.new("RGBA", (20, 20), (0, 0, 255, 255)), (0, 0, 255))
    put("cat/cmyk.jpg", Image.new("CMYK", (40, 30), (0, 255, 0, 0)), None, quality=100)
    palette = Image.new("P", (25, 25), 1)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    put("dog/palette.png", palette, (0, 255, 0))
    put("dog/palette_clear.png", palette, data.ALPHA_BACKGROUND, transparency=1)
    put("dog/i16.png", Image.fromarray(np.full((20, 30), 200 * 257, np.uint16)), (200, 200, 200))
    put("dog/la.png", Image.new("LA", (20, 20), (50, 255)), (50, 50, 50))
    put("dog/one_bit.png", Image.new("1", (20, 20), 1), (255, 255, 255))
    put("dog/tiny.png", Image.new("RGB", (3, 5), (200, 100, 0)), (200, 100, 0))
    put("zebra/i32.tif", Image.fromarray(np.full((10, 10), 40000, np.int32)), (156, 156, 156))
    put("zebra/big.jpg", Image.fromarray(np.random.default_rng(0).integers(0, 255, (1500, 2400, 3), np.uint8)),
        None, quality=70)
    (root / "zebra/sub").mkdir()
    put("zebra/sub/nested.png", Image.new("RGB", (8, 8), (1, 2, 3)), (1, 2, 3))
    good_jpeg = _jpeg_bytes(Image.new("RGB", (64, 64), (90, 90, 90)))
    bad = {"cat/truncated.jpg": good_jpeg[: len(good_jpeg) // 2], "cat/empty.jpg": b"",
           "dog/random.jpg": np.random.default_rng(1).integers(0, 256, 2000, np.uint8).tobytes(),
           "dog/text.png": b"this is not an image\n" * 10, "zebra/bomb.png": _bomb_png(20000)}
    for rel, payload in bad.items():
        (root / rel).write_bytes(payload)
    (root / "zebra/notes.txt").write_text("not an image")
    (root / "cat/.hidden.jpg").write_bytes(b"")
    return root, valid, {str(root / rel) for rel in bad}


def test_imagefolder_classes_and_valid_modes(image_folder):
    root, valid, bad = image_folder
    S = 16
    ds = data.ImageFolder(str(root), S)
    assert ds.classes == ["cat", "dog", "zebra"] and ds.num_classes == 3
    paths = [p.decode() for p in ds.paths]
    assert set(paths) == set(valid) | bad
    assert {str(root / "zebra/notes.txt"), str(root / "cat/.hidden.jpg")} == set(ds.ignored)
    lo, hi = normalised((0, 0, 0)), normalised((255, 255, 255))
    for i, path in enumerate(paths):
        if path in bad:
            continue
        item = ds[i]
        assert "bad" not in item, item
        assert ds.classes[int(item["label"])] == Path(path).relative_to(root).parts[0]
        x = item["image"].numpy()
        assert x.shape == (3, S, S) and x.dtype == np.float32
        assert (x >= lo[:, None, None] - 1e-5).all() and (x <= hi[:, None, None] + 1e-5).all()
        if valid[path] is not None:                      # constant image: exactly its colour
            assert np.allclose(x, normalised(valid[path])[:, None, None], atol=1e-5), path
    cmyk = ds[paths.index(str(root / "cat/cmyk.jpg"))]["image"]
    assert np.allclose(cmyk.mean((1, 2)).numpy(), normalised((255, 0, 255)), atol=0.05)   # magenta


def test_resize_center_crop_matches_pillow_resize_then_crop():
    rng = np.random.default_rng(0)
    for w, h, S in ((90, 30, 24), (37, 101, 16), (300, 200, 64), (5, 3, 32)):
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8))
        nw, nh = (S, int(S * h / w)) if w <= h else (int(S * w / h), S)
        left, top = int(round((nw - S) / 2)), int(round((nh - S) / 2))
        want = np.asarray(im.resize((nw, nh), Image.BILINEAR).crop((left, top, left + S, top + S)), np.float64)
        got = np.asarray(data.resize_center_crop(im, S), np.float64)
        assert got.shape == (S, S, 3) and np.abs(got - want).mean() < 1.0
    # A 3:1 image of red | green | blue thirds keeps only the green middle third.
    thirds = np.zeros((30, 90, 3), np.uint8)
    thirds[:, :30, 0], thirds[:, 30:60, 1], thirds[:, 60:, 2] = 255, 255, 255
    out = np.asarray(data.resize_center_crop(Image.fromarray(thirds), 12))
    assert (out[:, 1:-1] == (0, 255, 0)).all()


def test_imagefolder_bad_files_are_dropped_and_counted_with_workers(image_folder):
    root, valid, bad = image_folder
    ds = data.ImageFolder(str(root), 16)
    loader = DataLoader(ds, batch_size=4, shuffle=True, num_workers=2, collate_fn=data.collate,
                        generator=torch.Generator().manual_seed(0))
    n_good, n_bad, reasons, seen = 0, 0, [], []
    for batch in loader:
        n_bad += batch["n_bad"]
        reasons += batch["bad"]
        if "image" in batch:
            n_good += len(batch["image"])
            seen += batch["index"].tolist()
            for idx, label in zip(batch["index"].tolist(), batch["label"].tolist()):
                assert label == ds.labels[idx]
    assert n_good == len(valid) and n_bad == len(bad)
    assert {r.split(": ")[0] for r in reasons} == bad
    assert any("DecompressionBomb" in r for r in reasons)
    assert {ds.paths[i].decode() for i in seen} == set(valid)


def test_imagefolder_skips_images_over_max_pixels(tmp_path):
    (tmp_path / "a").mkdir()
    Image.new("RGB", (300, 200)).save(tmp_path / "a/big.png")
    Image.new("RGB", (300, 200)).save(tmp_path / "a/big.jpg")
    ds = data.ImageFolder(str(tmp_path), 16, max_pixels=10_000)
    items = {p.decode().rsplit("/", 1)[1]: ds[i] for i, p in enumerate(ds.paths)}
    assert "max_pixels" in items["big.png"]["bad"]
    assert items["big.jpg"]["image"].shape == (3, 16, 16)     # draft-decoded at 1/8: 38 x 25


def _position_image(W: int, H: int) -> Image.Image:
    """Red encodes the column, green the row: a crop's colours tell where it came from."""
    x = (np.arange(W) + 0.5) / W * 255
    y = (np.arange(H) + 0.5) / H * 255
    rgb = np.stack(np.broadcast_arrays(x[None, :], y[:, None], np.zeros((H, W))), -1)
    return Image.fromarray(np.rint(rgb).astype(np.uint8))


def test_imagefolder_training_view_is_a_random_resized_crop_and_flip(tmp_path):
    """The training view is a crop of 8-100% of the image area, aspect 3/4-4/3, resized to S,
    mirrored half the time; read off the pixels of an image that encodes its coordinates."""
    W, H, S = 300, 200, 32
    (tmp_path / "c").mkdir()
    _position_image(W, H).save(tmp_path / "c" / "pos.png")
    ds = data.ImageFolder(str(tmp_path), S, augment=True, seed=3)
    areas, flips = [], []
    for epoch in range(200):
        ds.set_epoch(epoch)
        rgb = ds[0]["image"].numpy() * STD[:, None, None] + MEAN[:, None, None]   # (3, S, S) in [0, 1]
        xs, ys = rgb[0, S // 2] * W, rgb[1, :, S // 2] * H                        # pixel columns, rows
        w, h = abs(xs[-1] - xs[0]) * S / (S - 1), (ys[-1] - ys[0]) * S / (S - 1)  # crop size, px
        flips.append(xs[-1] < xs[0])
        areas.append(w * h / (W * H))
        if w < W - 2 and h < H - 2:                                               # not the fallback
            assert 3 / 4 - 0.08 < w / h < 4 / 3 + 0.08
    areas = np.array(areas)
    assert areas.min() > 0.08 - 0.02 and areas.max() < 1.0 + 0.02
    assert 0.35 < np.mean(flips) < 0.65
    # Reproducible per (seed, epoch, index), whatever process reads it; new draws each epoch.
    ds.set_epoch(7)
    a = ds[0]["image"]
    again = data.ImageFolder(str(tmp_path), S, augment=True, seed=3)
    again.set_epoch(7)
    assert torch.equal(again[0]["image"], a)
    again.set_epoch(8)
    assert not torch.equal(again[0]["image"], a)
    other_seed = data.ImageFolder(str(tmp_path), S, augment=True, seed=4)
    other_seed.set_epoch(7)
    assert not torch.equal(other_seed[0]["image"], a)
    # The evaluation view stays the deterministic resize + centre crop.
    plain = data.ImageFolder(str(tmp_path), S)
    want = data._normalise(np.asarray(data.resize_center_crop(_position_image(W, H), S)))
    assert torch.equal(plain[0]["image"], want)


def test_random_resized_crop_box_statistics():
    """torchvision's RandomResizedCrop law: area fraction U(0.08, 1) when it fits, log-uniform
    aspect ratio in [3/4, 4/3], inside the image; the fallback is a central crop."""
    rng = np.random.default_rng(0)
    W, H = 1000, 1000
    boxes = np.array([data.random_resized_crop_box(rng, W, H) for _ in range(4000)])
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= W).all() and (boxes[:, 3] <= H).all()
    aspect = w / h
    assert aspect.min() > 3 / 4 - 0.01 and aspect.max() < 4 / 3 + 0.01
    assert abs(np.log(aspect).mean()) < 0.01                         # log-uniform, symmetric
    frac = w * h / (W * H)
    assert 0.08 - 0.005 < frac.min() and frac.max() <= 1.0
    # On a square, area a with aspect r fits iff a <= min(r, 1/r), i.e. |log r| <= -log a: the
    # accepted areas have density ~ P(fit | a) = min(1, -log a / log(4/3)) on [0.08, 1].
    a = np.linspace(0.08, 1, 100001)
    fit = np.minimum(1, -np.log(a) / np.log(4 / 3))
    assert abs(frac.mean() - (a * fit).sum() / fit.sum()) < 0.012          # 0.478; 3 std of the mean
    # A 100:1 strip fits no crop of >= 8% of its area with aspect <= 4/3 (its height would be
    # >= 24 px): the fallback, the central 4/3 crop, round(10 * 4/3) = 13 px wide.
    assert data.random_resized_crop_box(np.random.default_rng(1), 1000, 10) == (493, 0, 506, 10)


# ----------------------------------------------------------------------------------------------
# ADE20K
# ----------------------------------------------------------------------------------------------

PALETTE = {1: (255, 0, 0), 2: (0, 255, 0), 3: (0, 0, 255), 150: (255, 255, 255), 0: (0, 0, 0)}


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory):
    """ADEChallengeData2016 layout: annotations of raw labels from PALETTE's keys (0 = "other") in
    16 px blocks (training scene 0: left half 1, right half 2), and images painted with each
    label's PALETTE colour (JPEG quality 100)."""
    root = tmp_path_factory.mktemp("ade") / "ADEChallengeData2016"
    rng = np.random.default_rng(0)
    for split, n in (("training", 3), ("validation", 2)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for k in range(n):
            if split == "training" and k == 0:                        # left half 1 | right half 2
                raw = np.kron(np.array([[1, 2]], np.uint8), np.ones((80, 64), np.uint8))
            else:                                                     # non-square, random blocks
                raw = rng.choice(list(PALETTE), (8, 6) if k == 1 else (6, 10)).astype(np.uint8)
                raw = np.kron(raw, np.ones((16, 16), np.uint8))
            rgb = np.array([PALETTE[v] for v in raw.ravel()], np.uint8).reshape(*raw.shape, 3)
            stem = f"ADE_{split[:5]}_{k:08d}"
            Image.fromarray(rgb).save(root / "images" / split / f"{stem}.jpg", quality=100)
            Image.fromarray(raw, "L").save(root / "annotations" / split / f"{stem}.png")
    return root


def test_ade20k_square_resize_and_label_mapping(ade_root):
    ds = data.ADE20K(str(ade_root), "validation", image_size=32)
    assert len(ds) == 2
    for i in range(len(ds)):
        item = ds[i]
        raw = np.asarray(Image.open(ds.samples[i][1]))
        h, w = raw.shape
        # Direct square resize (no aspect kept): output pixel (r, c) shows source pixel centre
        # ((r + 0.5) h / 32, (c + 0.5) w / 32); nearest for the mask.
        rows = ((np.arange(32) + 0.5) * h / 32).astype(int)
        cols = ((np.arange(32) + 0.5) * w / 32).astype(int)
        src = raw[rows][:, cols].astype(np.int64)
        expect = np.where(src == 0, 255, src - 1)                    # 1..150 -> 0..149, 0 -> 255
        assert item["mask"].dtype == torch.int64 and item["image"].shape == (3, 32, 32)
        assert (item["mask"].numpy() == expect).mean() > 0.97         # boundary rounding only
        assert set(np.unique(item["mask"])) <= {255, 0, 1, 2, 149}


def _decode(image: torch.Tensor) -> np.ndarray:
    """Nearest PALETTE label of every pixel of a normalised image, (H, W)."""
    rgb = image.permute(1, 2, 0).numpy() * STD + MEAN                 # (H, W, 3) in [0, 1]
    keys = list(PALETTE)
    cols = np.array([PALETTE[k] for k in keys]) / 255
    return np.array(keys)[((rgb[:, :, None] - cols) ** 2).sum(-1).argmin(-1)]


def test_ade20k_augmentation_keeps_image_and_mask_aligned(ade_root):
    S = 48
    ds = data.ADE20K(str(ade_root), "training", image_size=S, augment=True)
    n_padded = 0
    for trial in range(30):
        ds.set_epoch(trial)                                           # new draws each epoch
        item = ds[trial % len(ds)]
        mask = item["mask"].numpy()
        labels = _decode(item["image"])
        expect = np.where(labels == 0, 255, labels - 1)               # the colour -> mapped label
        # Pixels whose 3x3 neighbourhood has one label (block edges are blurred by bilinear).
        m = np.pad(mask, 1, mode="edge")
        flat = np.all([m[1 + dy:S + 1 + dy, 1 + dx:S + 1 + dx] == mask
                       for dy in (-1, 0, 1) for dx in (-1, 0, 1)], 0)
        pad = (item["image"].abs().sum(0) < 1e-6).numpy()             # mean colour = padding
        inside = flat & ~pad
        assert (expect[inside] == mask[inside]).mean() > 0.99
        if pad.any():                  # scale r < 1: the scene is an n x n square, n >= S / 2
            n_padded += 1
            rows, cols = np.flatnonzero(~pad.all(1)), np.flatnonzero(~pad.all(0))
            n = len(rows)
            assert len(cols) == n and S / 2 - 1 <= n < S and (~pad).sum() == n * n
            assert (mask[pad] == 255).all()
    assert 0 < n_padded < 30           # both branches: padded (r < 1) and cropped (r >= 1)


def test_ade20k_augmentation_flips_half_the_time(ade_root):
    """Training scene 0 is label 1 on the left, 2 on the right: a flip puts 2 on the left."""
    ds = data.ADE20K(str(ade_root), "training", image_size=32, augment=True)
    order = []
    for epoch in range(60):
        ds.set_epoch(epoch)
        mask = ds[0]["mask"]
        cols = [torch.nonzero((mask == k).any(0)).float().mean() for k in (0, 1)]  # mean column
        if (mask == 0).any() and (mask == 1).any():
            order.append(bool(cols[0] > cols[1]))
    assert len(order) > 30 and 0.25 < np.mean(order) < 0.75


# ----------------------------------------------------------------------------------------------
# collate and build_dataset
# ----------------------------------------------------------------------------------------------

def test_collate_stacks_and_drops_bad():
    items = [{"image": torch.ones(3, 2, 2) * k, "label": torch.tensor(k), "index": k, "name": f"n{k}"}
             for k in range(3)]
    batch = data.collate([items[0], {"index": 9, "bad": "x.jpg: OSError: truncated"}, None, items[2]])
    assert batch["n_bad"] == 2 and batch["bad"] == ["x.jpg: OSError: truncated"]
    assert batch["image"].shape == (2, 3, 2, 2) and batch["label"].tolist() == [0, 2]
    assert batch["index"].dtype == torch.int64 and batch["index"].tolist() == [0, 2]
    assert batch["name"] == ["n0", "n2"]
    empty = data.collate([None, {"index": 1, "bad": "y: bad"}])
    assert empty == {"n_bad": 2, "bad": ["y: bad"]}


def test_build_dataset(image_folder, ade_root):
    cfg = data.DataConfig(image_size=32, length=7, val_length=3)
    train, val = data.build_dataset(cfg, "train"), data.build_dataset(cfg, "val")
    assert len(train) == 7 and len(val) == 3 and not torch.equal(train[0]["image"], val[0]["image"])
    ade = data.build_dataset(data.DataConfig(dataset="ade20k", root=str(ade_root)), "val", augment=True)
    assert isinstance(ade, data.ADE20K) and not ade.augment and len(ade) == 2   # never the val split
    root = image_folder[0].parent / "imagenet"
    (root / "train").mkdir(parents=True)
    (root / "train" / "only").mkdir()
    Image.new("RGB", (4, 4)).save(root / "train" / "only" / "a.png")
    with pytest.raises(data.DataError, match="data.num_classes = 10, but .* has 1 class folders"):
        data.build_dataset(data.DataConfig(dataset="imagefolder", root=str(root)), "train")
    assert len(data.build_dataset(data.DataConfig(dataset="imagefolder", root=str(root), num_classes=1))) == 1
    with pytest.raises(data.DataError, match="data.dataset = 'imagenet': one of synthetic, imagefolder, ade20k, fashion_mnist"):
        data.build_dataset(data.DataConfig(dataset="imagenet"))


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST: the IDX parser on files written here, scenes, splits, the real files
# ----------------------------------------------------------------------------------------------

def write_idx(path: Path, values: np.ndarray, magic: bytes | None = None, cut: int = 0) -> Path:
    """An IDX file of `values` (uint8) written from the format's description: magic 0 0 8 ndim,
    big-endian uint32 sizes, the bytes; gzip when the name ends in .gz. cut: bytes dropped at
    the end (of the compressed stream for .gz)."""
    head = (magic or bytes([0, 0, 8, values.ndim])) + struct.pack(f">{values.ndim}I", *values.shape)
    payload = head + values.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        payload = gzip.compress(payload, compresslevel=1)
    path.write_bytes(payload[:len(payload) - cut])
    return path


def test_read_idx_reads_what_was_written(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (5, 28, 28)), rng.integers(0, 10, 5)
    for name in ("a.gz", "a"):
        got = data.read_idx(str(write_idx(tmp_path / name, images)), (5, 28, 28))
        assert got.dtype == np.uint8 and np.array_equal(got, images)
    assert np.array_equal(data.read_idx(str(write_idx(tmp_path / "l.gz", labels)), (5,)), labels)


@pytest.mark.parametrize("damage, says", [
    (dict(cut=100), "truncated or damaged gzip"),                                   # a cut download
    (dict(name="x", cut=100), "values, expected 3920 (IDX of unsigned bytes, 5 x 28 x 28): the file is truncated"),
    (dict(magic=bytes([0, 0, 8, 1])), "magic number 0x00000801, expected 0x00000803"),   # a labels file
    (dict(magic=bytes([0, 0, 0x0D, 3])), "magic number 0x00000d03, expected 0x00000803"),  # floats
    (dict(magic=b"\x1f\x8b\x08\x03"), "magic number 0x1f8b0803"),                   # gzip twice
    (dict(shape=(5, 27, 28)), "dimensions 5 x 27 x 28, expected IDX of unsigned bytes, 5 x 28 x 28"),
    (dict(shape=(6, 28, 28)), "dimensions 6 x 28 x 28"),
    (dict(name="x", extra=1), "the file is longer than its header says"),
    (dict(name="missing.gz", write=False), "not found (expected IDX of unsigned bytes, 5 x 28 x 28)"),
    (dict(name="folder.gz", folder=True), "cannot be read"),
])
def test_read_idx_refuses_a_damaged_file_naming_it(tmp_path, damage, says):
    name = damage.get("name", "x.gz")
    path = tmp_path / name
    values = np.zeros(damage.get("shape", (5, 28, 28)), np.uint8)
    if damage.get("folder"):
        path.mkdir()
    elif damage.get("write", True):
        write_idx(path, values, damage.get("magic"), damage.get("cut", 0))
        if damage.get("extra"):
            path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(data.DataError) as e:
        data.read_idx(str(path), (5, 28, 28))
    message = str(e.value)
    assert message.startswith(str(path)) and says in message and "\n" not in message


def test_a_missing_fashion_mnist_folder_says_how_to_get_the_files(tmp_path):
    for root, says in ((tmp_path / "nowhere", "not a folder"),
                       (tmp_path, str(tmp_path / "train-images-idx3-ubyte.gz") + ": not found")):
        with pytest.raises(data.DataError) as e:
            data.load_fashion_mnist(str(root), "train")
        message = str(e.value)
        assert says in message and "\n" not in message
        assert "apt-get install dataset-fashion-mnist" in message and "zalandoresearch/fashion-mnist" in message
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((10_000, 28, 28), np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.full(10_000, 10, np.uint8))
    with pytest.raises(data.DataError, match="t10k-labels-idx1-ubyte.gz: a label 10, expected 0 to 9"):
        data.load_fashion_mnist(str(tmp_path), "val")


TRAIN_GREY, TEST_GREY = 102, 204          # every pixel of every item of the fake files' splits


@pytest.fixture(scope="module")
def fake_fashion_mnist(tmp_path_factory) -> Path:
    """The four files at their real sizes, each split's items one grey level (train 102, test
    204), labels i % 10; the label files unpacked (NAME, not NAME.gz), as some downloads are."""
    root = tmp_path_factory.mktemp("fashion")
    for split, (images, labels, n) in data.FASHION_MNIST_FILES.items():
        grey = TRAIN_GREY if split == "train" else TEST_GREY
        write_idx(root / (images + ".gz"), np.full((n, 28, 28), grey, np.uint8))
        write_idx(root / labels, np.arange(n) % 10)
    return root


@pytest.mark.parametrize("scene", ["plain", "cluttered", "crop"])
def test_fashion_train_and_val_never_share_an_item(fake_fashion_mnist, scene):
    """Val scenes are made of test items only and train scenes of training items only, clutter
    included: on the fake files, a training item's grey never shows in a val scene, nor the other
    way. (Pixels fully inside one item are exactly its grey; an edge pixel mixes it with black.)"""
    cfg = data.DataConfig(dataset="fashion_mnist", root=str(fake_fashion_mnist), image_size=256,
                          scene=scene, length=60_000, val_length=10_000, item_max=0.6, clutter=8)
    for split, own, other in (("train", TRAIN_GREY, TEST_GREY), ("val", TEST_GREY, TRAIN_GREY)):
        ds = data.build_dataset(cfg, split)
        assert len(ds) == (60_000 if split == "train" else 10_000) and len(ds.images) == len(ds)
        for i in (0, 1, 2, len(ds) - 1):
            grey, label, _ = ds.render(i)
            level = np.round(grey.astype(np.float64) * 255, 3)
            assert (level == own).sum() > 1000 and (level == other).sum() == 0
            assert label == i % 10 and ds[i]["label"] == i % 10


def _fashion_items(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n items of random grey with a black border, as Fashion-MNIST's; labels i % 10."""
    items = np.random.default_rng(seed).integers(0, 256, (n, 28, 28)).astype(np.uint8)
    items[:, :2], items[:, -2:], items[:, :, :2], items[:, :, -2:] = 0, 0, 0, 0
    return items, np.arange(n) % 10


SCENE_KINDS = [("plain", {}), ("cluttered", {}), ("cluttered", data.OBJECT_CENTRIC),
               ("cluttered", dict(item_size=(0.2, 0.7), clutter=8, fragment_px=5)), ("crop", {})]


@pytest.mark.parametrize("scene, kw", SCENE_KINDS)
def test_fashion_scenes_are_resolution_consistent(scene, kw):
    """A scene rendered at 2S (and 4S), box-downsampled 2 x 2 (4 x 4), is the render at S within
    1e-6: pixels are exact area means of one scene defined in scene units (float64 inside, float32
    out: rounding only)."""
    images, labels = _fashion_items()
    ds = data.FashionMNISTScenes(images, labels, 20, 48, scene, **kw)
    for i in range(6):
        small, label, target = ds.render(i)
        for k in (2, 4):
            large, label_k, target_k = ds.render(i, 48 * k)
            assert np.abs(_area_pool(large.astype(np.float64), k) - small).max() < 1e-6
            assert label_k == label and np.array_equal(target_k, target)
        assert small.std() > 0.05                  # not a blank scene


def test_fashion_scenes_are_deterministic_and_distinct():
    images, labels = _fashion_items()
    a = data.FashionMNISTScenes(images, labels, 30, 64)
    b = data.FashionMNISTScenes(images.copy(), labels.copy(), 30, 64)
    for i in (0, 7, 29):
        assert torch.equal(a[i]["image"], b[i]["image"]) and torch.equal(a[i]["target"], b[i]["target"])
    assert np.abs(a.render(3)[0] - a.render(4)[0]).mean() > 0.01
    # Item 3 again (index 43 = 3 mod 40): the same item at another place.
    c = data.FashionMNISTScenes(images, labels, 80, 64)
    assert c.render(43)[1] == c.render(3)[1] and not np.array_equal(c.render(43)[2], c.render(3)[2])
    for other in (data.FashionMNISTScenes(images, labels, 30, 64, seed=1),
                  data.FashionMNISTScenes(images, labels, 30, 64, split="val")):
        assert not np.array_equal(other.render(3)[2], a.render(3)[2])
    x = a[5]
    assert x["image"].shape == (3, 64, 64) and x["image"].dtype == torch.float32 and x["index"] == 5
    assert x["label"].dtype == torch.int64 and x["target"].dtype == torch.float32
    assert x["mask"].shape == (64, 64) and set(x["mask"].unique().tolist()) <= {0, 1, 2 + int(x["label"])}
    batches = {w: list(DataLoader(a, batch_size=8, num_workers=w, collate_fn=data.collate)) for w in (0, 2)}
    for b0, b2 in zip(batches[0], batches[2]):
        for k in ("image", "label", "index", "target", "mask"):
            assert torch.equal(b0[k], b2[k]), k


def test_fashion_plain_scene_is_the_item():
    """28 px: the item's own pixels, grey in R, G and B, ImageNet-normalised; 56 px: each pixel
    2 x 2 (the item is piecewise constant in scene units)."""
    images, labels = _fashion_items()
    ds = data.FashionMNISTScenes(images, labels, 40, 28, "plain")
    x = ds[7]
    expect = (images[7].astype(np.float64)[:, :, None] / 255 - MEAN) / STD           # (28, 28, 3)
    assert np.allclose(x["image"].permute(1, 2, 0).numpy(), expect, atol=1e-5)
    assert x["label"] == 7 and x["target"].tolist() == [0, 0, 1]
    assert np.abs(ds.render(7, 56)[0] - np.kron(images[7] / 255, np.ones((2, 2)))).max() < 1e-6


def test_fashion_target_is_the_items_square():
    """Without clutter, the scene's ink is the item's, moved to its box and scaled: its total is
    the item's times the box's area, its centroid the item's mapped into the box. So the target's
    (y, x) order, its (-1, -1) top-left corner and its half-side are those of the rendered item."""
    images, labels = _fashion_items()
    ds = data.FashionMNISTScenes(images, labels, 40, 96, "cluttered", (0.3, 0.8), clutter=0)
    for i in range(5):
        grey, label, (cy, cx, h) = ds.render(i)
        assert label == labels[i] and 0.3 <= h <= 0.8 and max(abs(cy), abs(cx)) <= 1 - h + 1e-6
        item = images[i].astype(np.float64) / 255
        pixel = (2 / 96) ** 2                                                       # scene units^2
        assert grey.sum() * pixel == pytest.approx(item.sum() * (2 * h / 28) ** 2, rel=1e-5)
        c = (np.arange(96) + 0.5) / 96 * 2 - 1                                      # pixel centres
        ci = (np.arange(28) + 0.5) / 28 * 2 - 1                                     # item cell centres
        assert (grey.sum(1) @ c) / grey.sum() == pytest.approx(cy + h * (item.sum(1) @ ci) / item.sum(), abs=1e-4)
        assert (grey.sum(0) @ c) / grey.sum() == pytest.approx(cx + h * (item.sum(0) @ ci) / item.sum(), abs=1e-4)
    # The crop is the window on that square: without clutter, at 28 px, the item itself.
    crop = data.FashionMNISTScenes(images, labels, 40, 28, "crop", (0.3, 0.8), clutter=0)
    assert np.abs(crop.render(3)[0] - images[3] / 255).max() < 1e-6
    assert crop.render(3)[2].tolist() == [0, 0, 1]


def test_fashion_clutter_is_fragments_of_other_items():
    """Each item of its own grey level (item k: 5 k + 5): a cluttered scene shows the main item's
    level and, where fragments lie fully on black, other items' levels, never its own as clutter;
    with clutter = 0 it shows only its own. Where a fragment overlaps the item, the brighter wins."""
    n = 40
    images, labels = np.repeat((np.arange(n, dtype=np.uint8) * 5 + 5)[:, None, None], 28, 1).repeat(28, 2), np.arange(n) % 10
    for clutter in (0, 6):
        ds = data.FashionMNISTScenes(images, labels, n, 256, "cluttered", (0.25, 0.25), clutter, 9)
        for i in range(8):
            layout = data.sample_layout(i, n, 0, "train", "cluttered", (0.25, 0.25), clutter, 9)
            assert len(layout["fragments"]) == clutter and all(f[0] != i for f in layout["fragments"])
            levels, counts = np.unique(np.round(ds.render(i)[0].astype(np.float64) * 255, 3), return_counts=True)
            # Levels of whole pixels inside one item (an edge pixel mixes a level with black).
            full = {level for level in levels[counts > 20].tolist() if level in range(5, 5 * n + 5, 5)}
            assert 5 * i + 5 in full
            assert full - {5 * i + 5} <= {5 * f[0] + 5 for f in layout["fragments"]}
            if clutter == 0:
                assert full == {5 * i + 5}
            # Layers combine by their maximum: no fragment darkens the item's square.
            (cy, cx, h), grey = layout["box"], ds.render(i)[0]
            inside = lambda c: np.abs((np.arange(256) + 0.5) / 128 - 1 - c) < h - 2 / 256     # whole pixels
            assert grey[np.ix_(inside(cy), inside(cx))].min() * 255 >= 5 * i + 5 - 1e-3


def test_fashion_fragments_are_at_the_items_scale():
    """A fragment is a fragment_px x fragment_px crop of another item drawn at the item's scale:
    on constant items (item k: grey 5 k + 5), a scene whose one fragment misses the item holds
    ink level_i (2 h)^2 + level_j (2 h fragment_px / 28)^2 in scene units."""
    n, S = 40, 128
    images = np.repeat((np.arange(n, dtype=np.uint8) * 5 + 5)[:, None, None], 28, 1).repeat(28, 2)
    ds = data.FashionMNISTScenes(images, np.arange(n) % 10, 200, S, "cluttered", (0.2, 0.5), 1, 7)
    checked = 0
    for i in range(200):
        layout = data.sample_layout(i, n, 0, "train", "cluttered", (0.2, 0.5), 1, 7)
        (cy, cx, h), (j, _, _, fy, fx) = layout["box"], layout["fragments"][0]
        hf = h * 7 / 28
        if max(abs(cy - fy), abs(cx - fx)) < h + hf:                   # overlapping: not additive
            continue
        ink = ds.render(i)[0].astype(np.float64).sum() * (2 / S) ** 2 * 255
        assert ink == pytest.approx((5 * (i % n) + 5) * (2 * h) ** 2 + (5 * j + 5) * (2 * hf) ** 2, rel=1e-5)
        checked += 1
    assert checked > 50


def test_fashion_scene_settings_are_checked():
    images, labels = _fashion_items()
    for kw, says in ((dict(scene="object"), "scene must be one of"), (dict(item_size=(0.5, 1.2)), "item_size"),
                     (dict(clutter=-1), "clutter = -1"), (dict(fragment_px=29), "fragment_px")):
        with pytest.raises(ValueError, match=says):
            data.FashionMNISTScenes(images, labels, 10, 64, **kw)
    with pytest.raises(ValueError, match="data.num_classes = 5"):
        data.build_dataset(data.DataConfig(dataset="fashion_mnist", num_classes=5))


# The real files: Debian's dataset-fashion-mnist (.ci/run installs it and sets
# REQUIRE_FASHION_MNIST=1, so that they are never skipped there).

def _real_root() -> str:
    files = [os.path.join(data.FASHION_MNIST_ROOT, name + ".gz")
             for images, labels, _ in data.FASHION_MNIST_FILES.values() for name in (images, labels)]
    if not all(os.path.isfile(f) for f in files) and not os.environ.get("REQUIRE_FASHION_MNIST"):
        pytest.skip(f"Fashion-MNIST is not in {data.FASHION_MNIST_ROOT} (apt-get install dataset-fashion-mnist)")
    return data.FASHION_MNIST_ROOT


def test_real_fashion_mnist_files():
    """The installed files: 60k / 10k items, 6,000 / 1,000 of each class (the dataset's own
    description), and the val split's plain 28 px scenes are the test file's images, read here
    with gzip and numpy alone."""
    root = _real_root()
    cfg = data.DataConfig(dataset="fashion_mnist", root=root, image_size=28, scene="plain",
                          length=60_000, val_length=10_000)
    train, val = data.build_dataset(cfg, "train"), data.build_dataset(cfg, "val")
    assert (len(train.images), len(val.images)) == (60_000, 10_000)
    assert np.bincount(train.labels).tolist() == [6000] * 10 and np.bincount(val.labels).tolist() == [1000] * 10
    raw = gzip.decompress((Path(root) / "t10k-images-idx3-ubyte.gz").read_bytes())
    test_images = np.frombuffer(raw[16:], np.uint8).reshape(10_000, 28, 28)
    test_labels = np.frombuffer(gzip.decompress((Path(root) / "t10k-labels-idx1-ubyte.gz").read_bytes())[8:], np.uint8)
    for i in (0, 1, 9_999):
        grey, label, _ = val.render(i)
        assert np.abs(grey - test_images[i] / 255).max() < 1e-6 and label == test_labels[i]
    assert not np.array_equal(train.render(0)[0], val.render(0)[0])


def test_fashion_masks_are_the_silhouettes_of_item_and_clutter():
    """Plain scenes at the items' own 28 px: the mask is 2 + label wherever the item's pixel is at
    least 0.1 bright, else background; cluttered scenes mark fragments (1) too."""
    gen = np.random.default_rng(0)
    images = gen.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    images[:, :4] = 0                                                  # some black rows
    labels = np.arange(6) % 10
    plain = data.FashionMNISTScenes(images, labels, 6, 28, scene="plain")
    for i in range(6):
        want = np.where(images[i] / 255.0 >= 0.1, 2 + labels[i], 0)
        assert np.array_equal(plain[i]["mask"].numpy(), want)
    cluttered = data.FashionMNISTScenes(images, labels, 6, 64, clutter=6)
    masks = [cluttered[i]["mask"] for i in range(6)]
    assert all((m == 1).any() and (m == 2 + labels[i]).any() for i, m in enumerate(masks))
    assert cluttered.num_segment_classes == 12
