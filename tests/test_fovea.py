"""fovea.py: extraction against independent computations, and the top-down geometry."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import fovea
from conftest import LocalRun, load_reference


def brute_force_means(img: torch.Tensor, box, p: int) -> torch.Tensor:
    """Float64 area means of the zero-extended pixel image over the p x p cells of one box.

    Independent of fovea.py: per-axis overlap lengths between each cell and each pixel,
    so mean = Wy @ img @ Wx^T / cell area. img: (C, H, W) -> (C, p, p).
    """
    C, H, W = img.shape
    y0, x0, y1, x1 = [float(v) for v in box]

    def overlaps(lo, hi, n):
        edges = torch.linspace(lo, hi, p + 1, dtype=torch.float64)
        pix = torch.arange(n, dtype=torch.float64)
        left = torch.maximum(edges[:-1, None], pix[None, :])
        right = torch.minimum(edges[1:, None], pix[None, :] + 1)
        return (right - left).clamp(min=0)                           # (p, n)

    Wy, Wx = overlaps(y0, y1, H), overlaps(x0, x1, W)
    cell = (y1 - y0) * (x1 - x0) / p ** 2
    return torch.einsum("ph,chw,qw->cpq", Wy, img.double(), Wx) / cell


# ---------------------------------------------------------------------------------------------
# integral_image
# ---------------------------------------------------------------------------------------------

def test_integral_image_is_exact_on_a_4096_image():
    gen = torch.Generator().manual_seed(0)
    img = torch.rand(1, 1, 4096, 4096, generator=gen)
    table = fovea.integral_image(img)
    sums = table.sums
    assert sums.shape == (1, 1, 4097, 4097) and sums.dtype == torch.float64
    assert (sums[..., 0, :] == 0).all() and (sums[..., :, 0] == 0).all()
    box = torch.tensor([[[4094.0, 4094.0, 4096.0, 4096.0]]])
    got = fovea.box_patches(table, box, 1, compiled=False)[0, 0, 0, 0, 0].double()
    want = img[0, 0, -2:, -2:].double().mean()
    assert abs(got - want) / want < 1e-6
    # The same lookup from a float32 running sum misses that tolerance by orders of magnitude.
    t32 = F.pad(img.cumsum(2).cumsum(3), (1, 0, 1, 0))
    naive = (t32[0, 0, 4096, 4096] - t32[0, 0, 4094, 4096] - t32[0, 0, 4096, 4094]
             + t32[0, 0, 4094, 4094]).double() / 4
    assert abs(naive - want) / want > 1e-4


def test_integral_image_of_uint8_is_exact_integers():
    gen = torch.Generator().manual_seed(1)
    img = torch.randint(0, 256, (2, 3, 33, 47), generator=gen, dtype=torch.uint8)
    table = fovea.integral_image(img)
    assert table.sums.dtype == torch.int64
    assert torch.equal(table.sums[:, :, 1:, 1:], img.long().cumsum(2).cumsum(3))
    boxes = torch.tensor([[[3.0, 5.0, 19.0, 29.0]], [[0.5, 1.25, 30.5, 40.0]]])
    got = fovea.box_patches(table, boxes, 4, compiled=False)
    for b in range(2):
        want = brute_force_means(img[b].double(), boxes[b, 0], 4)
        torch.testing.assert_close(got[b, 0].double(), want, rtol=1e-6, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# box_patches
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("exact", [True, False])
def test_aligned_boxes_equal_avg_pool(exact):
    gen = torch.Generator().manual_seed(2)
    img = torch.rand(2, 3, 64, 96, generator=gen)
    table = fovea.integral_image(img)
    # (y0, x0, side, p): integer-aligned boxes whose cells are whole pixels.
    specs = [(0, 0, 64, 8), (16, 32, 32, 8), (8, 40, 16, 16), (48, 80, 16, 4)]
    boxes = torch.tensor([[[y, x, y + s, x + s] for y, x, s, _ in specs]] * 2, dtype=torch.float32)
    for i, (y, x, s, p) in enumerate(specs):
        got = fovea.box_patches(table, boxes[:, i:i + 1], p, exact=exact, compiled=False)[:, 0]
        want = F.avg_pool2d(img[:, :, y:y + s, x:x + s], s // p)
        torch.testing.assert_close(got, want, rtol=0, atol=2e-6)


def test_exact_mode_matches_brute_force_on_random_fractional_boxes():
    gen = torch.Generator().manual_seed(3)
    H, W = 41, 67
    img = torch.randn(3, 2, H, W, generator=gen)
    table = fovea.integral_image(img)
    # Random boxes of every size: inside, straddling the border, wholly outside, sub-pixel cells.
    c = torch.rand(3, 12, 2, generator=gen) * torch.tensor([H * 1.6, W * 1.6]) - torch.tensor([H * 0.3, W * 0.3])
    side = torch.exp(torch.rand(3, 12, 2, generator=gen) * math.log(120)) + 0.3
    boxes = torch.cat([c - side / 2, c + side / 2], -1)
    p = 5
    got = fovea.box_patches(table, boxes, p, compiled=False)
    assert got.shape == (3, 12, 2, p, p) and got.dtype == torch.float32
    for b in range(3):
        for i in range(12):
            want = brute_force_means(img[b], boxes[b, i], p)
            torch.testing.assert_close(got[b, i].double(), want, rtol=1e-5, atol=1e-5)


def brute_force_nearest(img: torch.Tensor, box, p: int) -> torch.Tensor:
    """[000] App. A's nearest-pixel box filter, by loops over cells and pixel slices: each cell
    edge snapped to the nearest pixel corner (a cell keeps at least one pixel), the mean over
    the zero-extended image. img: (C, H, W) -> (C, p, p) float64."""
    C, H, W = img.shape
    y0, x0, y1, x1 = [float(v) for v in box]
    snap = lambda lo, hi: [math.floor(lo + (hi - lo) * k / p + 0.5) for k in range(p + 1)]
    ey, ex = snap(y0, y1), snap(x0, x1)
    pad = 64
    big = F.pad(img.double(), (pad, pad, pad, pad))                  # zeros outside
    out = torch.zeros(C, p, p, dtype=torch.float64)
    for i in range(p):
        for j in range(p):
            r0, c0 = ey[i], ex[j]
            r1, c1 = max(ey[i + 1], r0 + 1), max(ex[j + 1], c0 + 1)
            out[:, i, j] = big[:, r0 + pad:r1 + pad, c0 + pad:c1 + pad].mean((1, 2))
    return out


def test_nearest_mode_error_bounds():
    gen = torch.Generator().manual_seed(4)
    H, W, p = 96, 128, 8
    # (1) On a linear ramp a*y + b*x, snapping each cell edge by <= 0.5 px moves the cell mean
    # by at most |a| + |b| (0.5 per axis from the shifted centre, 0.5 from pixelisation).
    a, b = 0.013, -0.021
    yy, xx = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    ramp = (a * yy + b * xx)[None, None].double()
    c = torch.rand(1, 50, 2, generator=gen) * torch.tensor([H * 0.5, W * 0.5]) + torch.tensor([H * 0.25, W * 0.25])
    side = torch.rand(1, 50, 1, generator=gen) * 30 + 8            # cells >= 1 px, inside
    boxes = torch.cat([c - side / 2, c + side / 2], -1)
    table = fovea.integral_image(ramp)
    err = (fovea.box_patches(table, boxes, p, exact=False, compiled=False)
           - fovea.box_patches(table, boxes, p, exact=True, compiled=False)).abs().max()
    assert 0 < err <= abs(a) + abs(b) + 1e-6
    # (2) On noise, the nearest mode is exactly the paper's rule computed by brute force, for
    # boxes inside, across the border and with sub-pixel cells (a shift by a pixel fails).
    noise = torch.rand(1, 3, H, W, generator=gen)
    c = torch.rand(1, 30, 2, generator=gen) * torch.tensor([H * 1.2, W * 1.2]) - torch.tensor([H * 0.1, W * 0.1])
    side = torch.exp(torch.rand(1, 30, 1, generator=gen) * math.log(60)) + 2
    boxes = torch.cat([c - side / 2, c + side / 2], -1)
    near = fovea.box_patches(fovea.integral_image(noise), boxes, p, exact=False, compiled=False)
    for i in range(30):
        want = brute_force_nearest(noise[0], boxes[0, i], p)
        torch.testing.assert_close(near[0, i].double(), want, rtol=0, atol=1e-6)


def test_outside_the_image_is_zero():
    img = torch.rand(1, 3, 16, 16) + 1.0                           # strictly positive
    table = fovea.integral_image(img)
    boxes = torch.tensor([[[-40.0, -40.0, -8.0, -8.0],             # wholly outside
                           [0.0, 0.0, 16.0, 32.0]]])               # right half outside
    out = fovea.box_patches(table, boxes, 4, compiled=False)[0]
    assert (out[0] == 0).all()
    assert (out[1, :, :, 2:] == 0).all()
    torch.testing.assert_close(out[1, :, :, :2], F.avg_pool2d(img, (4, 8))[0][:, :, :2] * 1.0)


def test_compiled_equals_eager_without_recompiling():
    gen = torch.Generator().manual_seed(5)
    img = torch.rand(2, 3, 50, 70, generator=gen)
    table = fovea.integral_image(img)
    boxes = lambda: torch.cat([torch.rand(2, 6, 2, generator=gen) * 40,
                               torch.rand(2, 6, 2, generator=gen) * 40 + 45], -1)
    first = boxes()
    torch.testing.assert_close(fovea.box_patches(table, first, 8),
                               fovea.box_patches(table, first, 8, compiled=False), rtol=0, atol=1e-6)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):                                        # new box values, same shapes
            bx = boxes()
            torch.testing.assert_close(fovea.box_patches(table, bx, 8),
                                       fovea.box_patches(table, bx, 8, compiled=False),
                                       rtol=0, atol=1e-6)


def test_bad_boxes_fail_loudly():
    table = fovea.integral_image(torch.rand(1, 3, 8, 8))
    with pytest.raises(RuntimeError, match="y1 > y0"):
        fovea.box_patches(table, torch.tensor([[[4.0, 0.0, 2.0, 8.0]]]), 2, compiled=False)
    with pytest.raises(RuntimeError, match="y1 > y0"):
        fovea.box_patches(table, torch.tensor([[[0.0, float("nan"), 2.0, 8.0]]]), 2, compiled=False)
    with pytest.raises(ValueError, match="boxes"):
        fovea.box_patches(table, torch.zeros(1, 4), 2, compiled=False)


def test_an_image_where_a_table_is_expected_is_refused():
    img = torch.rand(2, 3, 16, 16)
    boxes = torch.tensor([[[0.0, 0.0, 8.0, 8.0]]]).expand(2, 1, 4)
    with pytest.raises(TypeError, match=r"fovea.integral_image\(images\), not the images"):
        fovea.box_patches(img, boxes, 2, compiled=False)
    model = fovea.FovealViT(tiny_foveal())
    with pytest.raises(TypeError, match="SummedAreaTable"):
        model.step(img, None, torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        fovea.integral_image(torch.rand(3, 16, 16))


@pytest.mark.parametrize("compiled", [False, True])
def test_traces_share_their_image_table(compiled):
    """G traces of B images read B tables: the same patches as G copies of each table."""
    gen = torch.Generator().manual_seed(8)
    B, G = 3, 4
    img = torch.rand(B, 3, 40, 52, generator=gen)
    rows = torch.arange(B).repeat_interleave(G)                               # (B*G,)
    shared = fovea.integral_image(img).select(rows)
    copied = fovea.integral_image(img.repeat_interleave(G, 0))
    assert len(shared) == B * G and shared.sums.shape[0] == B              # no copy of a table
    boxes = torch.cat([torch.rand(B * G, 5, 2, generator=gen) * 30,
                       torch.rand(B * G, 5, 2, generator=gen) * 30 + 31], -1)
    for exact in (True, False):
        got = fovea.box_patches(shared, boxes, 4, exact=exact, compiled=compiled)
        want = fovea.box_patches(copied, boxes, 4, exact=exact, compiled=False)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # a selection of a selection composes: every second trace of the shared rows
    sub = shared.select(torch.arange(0, B * G, 2))
    torch.testing.assert_close(fovea.box_patches(sub, boxes[::2], 4, compiled=False),
                               fovea.box_patches(copied, boxes, 4, compiled=False)[::2], rtol=0, atol=0)


def test_same_scene_at_two_resolutions_gives_the_same_patches():
    """The top-down property: patches depend on the scene, not on its pixel count."""
    gen = torch.Generator().manual_seed(6)
    small = torch.rand(1, 3, 40, 56, generator=gen)
    big = small.repeat_interleave(2, 2).repeat_interleave(2, 3)   # exact 2x upsampling
    gaze = torch.tensor([[0.3, -0.45]])
    outs = []
    for img in (small, big):
        ctx = fovea.foveal_context(gaze, tuple(img.shape[-2:]), num_zoom=6, max_z=3.0, grid=3, grid_z=3.5)
        outs.append(fovea.box_patches(fovea.integral_image(img), ctx.boxes, 8, compiled=False))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-5)
    # Bilinear point sampling has no such property: it sees different pixels at each size.
    vp = lambda img: fovea.bilinear_glimpse(img, gaze, torch.tensor([0.5]), 8)
    assert (vp(small) - vp(big)).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------
# bilinear_glimpse vs the official CanViT glimpses
# ---------------------------------------------------------------------------------------------

def test_bilinear_glimpse_reproduces_official_canvit(reference_dir):
    ref = load_reference(reference_dir, "canvit/canvit_tiny_ref.pt")
    for step in ref["steps"]:
        args = (step["viewpoint_center_yx"], step["viewpoint_scale"], ref["glimpse_px"])
        torch.testing.assert_close(fovea.bilinear_glimpse(ref["scene"], *args), step["glimpse"],
                                   rtol=0, atol=1e-6)
        torch.testing.assert_close(fovea.viewpoint_glimpse(ref["scene"], *args), step["glimpse"],
                                   rtol=0, atol=1e-6)
        # From a table, the same viewpoint is box filtered over its square.
        box = fovea.viewpoint_boxes(step["viewpoint_center_yx"], step["viewpoint_scale"],
                                    tuple(ref["scene"].shape[-2:]))
        got = fovea.viewpoint_glimpse(fovea.integral_image(ref["scene"]), *args)
        want = brute_force_means(ref["scene"][0], box[0], ref["glimpse_px"])
        torch.testing.assert_close(got[0].double(), want, rtol=1e-5, atol=1e-5)


def test_viewpoint_boxes_agree_with_official_patch_positions(reference_dir):
    ref = load_reference(reference_dir, "canvit/canvit_tiny_ref.pt")
    S, n = ref["scene_px"], ref["glimpse_px"] // 16
    for step in ref["steps"]:
        box = fovea.viewpoint_boxes(step["viewpoint_center_yx"], step["viewpoint_scale"], (S, S))[0]
        cells = fovea.vit_grid(1, (1, 1), n).boxes[0]             # unit-square cells (n*n, 4)
        side = box[2] - box[0]
        cy = box[0] + (cells[:, 0] + cells[:, 2]) / 2 * side       # cell centres, px
        cx = box[1] + (cells[:, 1] + cells[:, 3]) / 2 * side
        yx = torch.stack([cy / S * 2 - 1, cx / S * 2 - 1], -1)
        torch.testing.assert_close(yx, step["local_positions_yx"][0], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------

def centres_px(boxes):
    return (boxes[..., 0] + boxes[..., 2]) / 2, (boxes[..., 1] + boxes[..., 3]) / 2


def test_multizoom_patches_are_concentric_and_halve_per_zoom_step():
    H, W = 300, 420
    gaze = torch.tensor([[0.2, -0.6], [-1.0, 1.0]])
    pt = fovea.multizoom_patches(gaze, (H, W), num_patches=5, max_z=4.0)   # max_z / (M - 1) = 1
    assert pt.boxes.shape == (2, 5, 4) and pt.yxz.shape == (2, 5, 3)
    cy, cx = centres_px(pt.boxes)
    torch.testing.assert_close(cy, ((gaze[:, 0] + 1) / 2 * H)[:, None].expand(2, 5))
    torch.testing.assert_close(cx, ((gaze[:, 1] + 1) / 2 * W)[:, None].expand(2, 5))
    side_y, side_x = pt.boxes[..., 2] - pt.boxes[..., 0], pt.boxes[..., 3] - pt.boxes[..., 1]
    torch.testing.assert_close(side_y, side_x)
    torch.testing.assert_close(side_y[0], torch.tensor([300.0, 150.0, 75.0, 37.5, 18.75]))
    torch.testing.assert_close(pt.yxz[0, :, 2], torch.tensor([0.0, 1, 2, 3, 4]))
    torch.testing.assert_close(pt.yxz[..., :2], gaze[:, None].expand(2, 5, 2))


def test_foveal_grid_hand_worked_cases():
    """Eq. 5-6 worked by hand on a 256 x 384 image (S = 256 / 2^z)."""
    # Gaze at the centre (pixel 128, 192), g = 2, z = 3: S = 32, cells offset by -16 / +16.
    pt = fovea.foveal_grid(torch.tensor([[0.0, 0.0]]), (256, 384), grid=2, z=3.0)
    want = torch.tensor([[96, 160, 128, 192], [96, 192, 128, 224],
                         [128, 160, 160, 192], [128, 192, 160, 224]], dtype=torch.float32)
    torch.testing.assert_close(pt.boxes[0], want)
    torch.testing.assert_close(pt.yxz[0, 0], torch.tensor([112 / 128 - 1, 176 / 192 - 1, 3.0]))
    # Gaze (y, x) = (-0.5, 0.5) (pixel 64, 288), g = 3, z = 4: S = 16, centres 48/64/80, 272/288/304.
    pt = fovea.foveal_grid(torch.tensor([[-0.5, 0.5]]), (256, 384), grid=3, z=torch.tensor([4.0]))
    torch.testing.assert_close(pt.boxes[0, 0], torch.tensor([40.0, 264.0, 56.0, 280.0]))
    torch.testing.assert_close(pt.boxes[0, 5], torch.tensor([56.0, 296.0, 72.0, 312.0]))   # (1, 2)
    torch.testing.assert_close(pt.boxes[0, 8], torch.tensor([72.0, 296.0, 88.0, 312.0]))   # (2, 2)
    # g = 1 is one patch of side S centred on the gaze.
    pt = fovea.foveal_grid(torch.tensor([[0.5, -0.25]]), (256, 384), grid=1, z=1.0)
    torch.testing.assert_close(pt.boxes[0, 0], torch.tensor([128.0, 80.0, 256.0, 208.0]))


@pytest.mark.parametrize("g", [2, 5])
def test_foveal_grid_tiles_a_square_around_the_gaze(g):
    """The g^2 cells tile a square of side g * S centred on the gaze: no gap, no overlap."""
    pt = fovea.foveal_grid(torch.tensor([[0.1, 0.3]]), (256, 384), grid=g, z=2.5)
    img = torch.ones(1, 1, 256, 384)
    S = 256 / 2 ** 2.5
    b = pt.boxes[0]
    torch.testing.assert_close(((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).sum(), torch.tensor((g * S) ** 2))
    hull = torch.stack([b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()])
    centre = torch.tensor([(0.1 + 1) / 2 * 256, (0.3 + 1) / 2 * 384])
    torch.testing.assert_close(hull, torch.cat([centre - g * S / 2, centre + g * S / 2]))
    # every pixel of the hull is in exactly one cell: the cell areas of an all-ones image add up
    cover = fovea.box_patches(fovea.integral_image(img), pt.boxes, 1, compiled=False).sum()
    assert cover.item() == pytest.approx(g * g)


def test_foveal_context_is_top_down():
    """Multi-zoom patches then the foveal grid; at any image size the same fractions of it."""
    gaze = torch.tensor([[0.3, -0.2], [-0.7, 0.6]])
    ctx = {hw: fovea.foveal_context(gaze, hw, num_zoom=16, max_z=4.0, grid=5, grid_z=4.0)
           for hw in [(64, 96), (1000, 1500)]}
    small, big = ctx[(64, 96)], ctx[(1000, 1500)]
    assert small.boxes.shape == big.boxes.shape == (2, 16 + 25, 4)         # a fixed token count
    scale = torch.tensor([64.0, 96.0, 64.0, 96.0])
    torch.testing.assert_close(small.boxes / scale, big.boxes / (scale * 1000 / 64))  # same fractions
    torch.testing.assert_close(small.yxz, big.yxz)
    mz = fovea.multizoom_patches(gaze, (64, 96), 16, 4.0)
    torch.testing.assert_close(small.boxes[:, :16], mz.boxes)
    torch.testing.assert_close(small.boxes[:, 16:], fovea.foveal_grid(gaze, (64, 96), 5, 4.0).boxes)


def test_vit_grid_tiles_the_whole_image():
    H, W, g = 120, 200, 4
    pt = fovea.vit_grid(2, (H, W), g)
    b = pt.boxes[0]
    assert b[:, 0].min() == 0 and b[:, 1].min() == 0 and b[:, 2].max() == H and b[:, 3].max() == W
    areas = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    torch.testing.assert_close(areas.sum(), torch.tensor(float(H * W)))  # no gap, no overlap
    img = torch.rand(2, 3, H, W)
    out = fovea.box_patches(fovea.integral_image(img), pt.boxes, 5, compiled=False)   # 30x50 px cells
    pooled = F.avg_pool2d(img, (6, 10))                            # (2, 3, 20, 20)
    want = pooled.view(2, 3, g, 5, g, 5).permute(0, 2, 4, 1, 3, 5).reshape(2, g * g, 3, 5, 5)
    torch.testing.assert_close(out, want, rtol=0, atol=2e-6)


@pytest.mark.parametrize("size,area", [((224, 224), (0.32, 1.0)), ((224, 224), (0.05, 0.32)),
                                       ((300, 500), (0.32, 1.0))])
def test_random_grid_crops_cover_the_requested_area_inside_the_image(size, area):
    H, W = size
    g = 4
    gen = torch.Generator().manual_seed(7)
    pt = fovea.random_grid_crops(4000, size, g, area, generator=gen)
    b = pt.boxes
    frac = (b[..., 2].amax(1) - b[..., 0].amin(1)) * (b[..., 3].amax(1) - b[..., 1].amin(1)) / (H * W)
    hi = min(area[1], min(H, W) / max(H, W))                      # a square must fit
    assert frac.min() >= area[0] - 1e-4 and frac.max() <= hi + 1e-4
    assert abs(frac.mean().item() - (area[0] + hi) / 2) < 0.01    # area ~ U(lo, hi)
    tol = 1e-3
    assert (b[..., 0] >= -tol).all() and (b[..., 1] >= -tol).all()
    assert (b[..., 2] <= H + tol).all() and (b[..., 3] <= W + tol).all()
    # Eq. 7: the zoom of a grid covering `area` of a square image.
    assert math.isclose(fovea.area_to_zoom(0.32, 16), math.log2(16 / math.sqrt(0.32)))


def test_bad_geometry_inputs_fail_loudly():
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        fovea.multizoom_patches(torch.zeros(2), (32, 32))
    with pytest.raises(ValueError, match="area_range"):
        fovea.random_grid_crops(2, (32, 32), 4, (0.5, 0.2))


# ---------------------------------------------------------------------------------------------
# The foveal iterative ViT [002, 000]
# ---------------------------------------------------------------------------------------------

def tiny_foveal(**kw) -> fovea.FovealConfig:
    base = dict(dim=32, depth=2, heads=2, num_state=3, num_zoom=4, max_z=3.0, grid=2, grid_z=(3.0, 3.0),
                num_classes=5, layerscale=0.0, compile_extraction=False)
    return fovea.FovealConfig(**{**base, **kw})


def test_no_gradient_reaches_the_previous_step():
    torch.manual_seed(0)
    model = fovea.FovealViT(tiny_foveal())
    table = fovea.integral_image(torch.randn(2, 3, 64, 64))
    s1 = model.step(table, None, torch.tensor([[0.1, 0.2], [-0.3, 0.4]]))
    reached = []
    s1.register_hook(lambda g: reached.append(g))
    s2 = model.step(table, s1, torch.tensor([[-0.5, 0.0], [0.6, -0.6]]))
    model.classify(s2).sum().backward()
    assert not reached                                      # step 2's loss stops at its input
    assert model.blocks[0].qk.weight.grad.abs().sum() > 0   # and still trains step 2


def _tensors(xs):
    for x in xs:
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, (tuple, list)):
            yield from _tensors(x)


class CountWork(torch.overrides.TorchFunctionMode):
    """Counts torch calls and the elements of every new tensor they return (a measure of work;
    views of an input, such as a reshaped table, are not new)."""

    def __init__(self):
        super().__init__()
        self.calls, self.elements = 0, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls += 1
        inputs = {t.untyped_storage().data_ptr() for t in _tensors([*args, *(kwargs or {}).values()])}
        for t in _tensors(out if isinstance(out, (tuple, list)) else [out]):
            if t.untyped_storage().data_ptr() not in inputs:
                self.elements += t.numel()
        return out


def test_a_step_does_the_same_work_at_any_image_size():
    """Once the table is built, a step's ops, their output sizes and FLOPs do not depend on the
    image size (an extraction that crops and resizes pixels would scale with the image)."""
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    model = fovea.FovealViT(tiny_foveal())
    gaze = torch.tensor([[0.2, -0.1]])
    work, flops, tokens = [], [], []
    for side in (64, 1024):
        table = fovea.integral_image(torch.randn(1, 3, side, side))
        tokens.append(model.embed(table, model.glimpse(gaze, (side, side))).shape)
        with CountWork() as counter:
            model.step(table, None, gaze)
        work.append((counter.calls, counter.elements))
        with FlopCounterMode(display=False) as fc:
            model.step(table, None, gaze)
        flops.append(fc.get_total_flops())
    assert tokens[0] == tokens[1] == (1, 4 + 4, 32)
    assert work[0] == work[1] and work[0][1] > 0
    assert flops[0] == flops[1] > 0
    # The counter has teeth: a step that builds its table (once per glimpse instead of once per
    # image) does scale with the image.
    per_step = []
    for side in (64, 1024):
        img = torch.randn(1, 3, side, side)
        with CountWork() as counter:
            model.step(fovea.integral_image(img), None, gaze)
        per_step.append(counter.elements)
    assert per_step[1] > 10 * per_step[0]


def test_vit_mode_equals_an_independent_forward_on_pixel_patches():
    """On a 64 px image a 4 x 4 grid is exactly the 16 px pixel patches of a ViT."""
    torch.manual_seed(0)
    model = fovea.FovealViT(tiny_foveal(z_max=4.0)).eval()
    img = torch.randn(2, 3, 64, 64)
    got = model.vit_mode(fovea.integral_image(img), grid=4)
    pix = F.unfold(img, 16, stride=16).transpose(1, 2)                      # (B, 16, 3*16*16)
    c = (torch.arange(4) + 0.5) / 4                                         # centres in [0, 1]
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    xyz = torch.stack([xx.reshape(-1), yy.reshape(-1), torch.full((16,), 2.0 / 4.0)], -1)  # z = log2 4, / z_max
    tokens = model.patch_embed(pix) + model.pos_mlp(xyz)
    state = model.state_prompt.expand(2, -1, -1)
    x = torch.cat([state, tokens], 1)
    q = F.pad(state, (0, 0, 0, 16))
    for blk in model.blocks:
        x = blk(x, q)
    torch.testing.assert_close(got, model.norm(x[:, :3]), rtol=1e-5, atol=1e-5)


def test_combine_mlp_head_is_a_learned_combination_then_an_mlp():
    """[002] A.3.2: with one-hot combination weights the head reads one state vector."""
    torch.manual_seed(0)
    model = fovea.FovealViT(tiny_foveal(head="combine_mlp"))
    state = torch.randn(4, 3, 32)
    with torch.no_grad():
        for k in range(3):
            model.head.weights.copy_(F.one_hot(torch.tensor(k), 3).float())
            torch.testing.assert_close(model.classify(state), model.head.mlp(state[:, k]))
        model.head.weights.copy_(torch.tensor([0.2, 0.3, 0.5]))
        mixed = 0.2 * state[:, 0] + 0.3 * state[:, 1] + 0.5 * state[:, 2]
        torch.testing.assert_close(model.classify(state), model.head.mlp(mixed))


def test_linear_head_reads_the_first_state_token_only():
    """[000] Sec. 4: a linear layer on the first state token."""
    torch.manual_seed(0)
    model = fovea.FovealViT(tiny_foveal(head="linear"))
    state = torch.randn(4, 3, 32)
    torch.testing.assert_close(model.classify(state), state[:, 0] @ model.head.fc.weight.T + model.head.fc.bias)


def test_transformer_head_pools_every_state_token_without_order():
    """[000] Sec. 4: one transformer layer over all state tokens: the order of the tokens does
    not matter (no positions), and every token changes the output."""
    torch.manual_seed(0)
    model = fovea.FovealViT(tiny_foveal(head="transformer"))
    with torch.no_grad():
        model.head.token.normal_()                         # a non-zero pooling token
    state = torch.randn(4, 3, 32)
    out = model.classify(state)
    torch.testing.assert_close(model.classify(state[:, [2, 0, 1]]), out, rtol=1e-5, atol=1e-5)
    for k in range(3):
        other = state.clone()
        other[:, k] += torch.randn(4, 32)
        assert (model.classify(other) - out).abs().max() > 1e-3
    with pytest.raises(ValueError, match="unknown head"):
        fovea.FovealViT(tiny_foveal(head="mean"))


def test_mixup_mixes_labels_as_it_mixes_images():
    labels = torch.tensor([0, 3, 1, 4])
    images = labels.float()[:, None, None, None].expand(4, 3, 8, 8)       # image value = its label
    mixed, target = fovea.mixup(images, labels, 5, lam=0.3)
    expected_label = (target * torch.arange(5.0)).sum(-1)                   # E[label] under the target
    torch.testing.assert_close(mixed[:, 0, 0, 0], expected_label)
    torch.testing.assert_close(target.sum(-1), torch.ones(4))
    assert target[0, 0] == pytest.approx(0.3) and target[0, 3] == pytest.approx(0.7)   # partner: 1
    assert target[3, 4] == pytest.approx(0.3) and target[3, 1] == pytest.approx(0.7)   # partner: 2
    odd_images, odd_target = fovea.mixup(images[:3], labels[:3], 5, lam=0.3)     # bad images dropped
    torch.testing.assert_close(odd_images[2], images[2])                   # the last one: unmixed
    torch.testing.assert_close(odd_target[2], F.one_hot(labels[2], 5).float())


def test_mixup_does_not_depend_on_the_number_of_processes():
    """Two processes' contiguous halves mix exactly as the whole batch on one process."""
    gen = torch.Generator().manual_seed(9)
    images, labels = torch.randn(8, 3, 4, 4, generator=gen), torch.randint(0, 5, (8,), generator=gen)
    lam = fovea.mixup_lambda(torch.Generator().manual_seed(1), 0.8)
    assert 0 < lam < 1 and lam == fovea.mixup_lambda(torch.Generator().manual_seed(1), 0.8)
    whole = fovea.mixup(images, labels, 5, lam)
    halves = [fovea.mixup(images[s], labels[s], 5, lam) for s in (slice(0, 4), slice(4, 8))]
    for k in range(2):
        torch.testing.assert_close(torch.cat([h[k] for h in halves]), whole[k], rtol=0, atol=0)


def test_fixed_gazes():
    g = fovea.fixed_gazes(11)
    assert g.shape == (11, 2) and (g[0] == 0).all() and (g.abs() < 1).all()
    assert len({tuple(p) for p in g[:9].tolist()}) == 9 and torch.equal(g[9], g[0])


def test_shuffled_vit_episode_shows_every_patch_once():
    cfg = fovea.FovealTrainConfig(model=tiny_foveal(grid=0), steps=4, glimpse="shuffled_vit", vit_grid=16)
    obj = fovea.FovealSupervised(cfg, seed=0)
    groups = fovea.episode_patches(obj.model, cfg, torch.Generator().manual_seed(0), 2, (256, 256),
                                   torch.device("cpu"))
    assert len(groups) == 4 and all(g.boxes.shape == (2, 64, 4) for g in groups)
    boxes = torch.cat([g.boxes for g in groups], 1)                         # (2, 256, 4)
    for b in range(2):
        got = sorted(map(tuple, boxes[b].tolist()))
        assert got == sorted(map(tuple, fovea.vit_grid(1, (256, 256), 16).boxes[0].tolist()))
        assert (boxes[b, :64] != fovea.vit_grid(1, (256, 256), 16).boxes[0, :64]).any()   # shuffled
    assert (groups[0].boxes[0] != groups[0].boxes[1]).any()                 # per image


def test_the_task_prompt_learns_from_the_first_step_only():
    """[002] Sec. 4, [000] Sec. 2.1: s_1 is a learned embedding. It receives the gradient of
    the first step's loss, and nothing from later steps (their input state is detached)."""
    torch.manual_seed(0)
    cfg = fovea.FovealTrainConfig(model=tiny_foveal(), steps=3, mixup_alpha=0.0)
    obj = fovea.FovealSupervised(cfg, seed=0)
    gen = torch.Generator().manual_seed(1)
    batch = {"image": torch.randn(6, 3, 48, 48, generator=gen), "label": torch.arange(6) % 5}
    obj.train_step(batch, 0, LocalRun())
    full = obj.model.state_prompt.grad
    assert full is not None and full.abs().sum() > 0
    # Independent: the gradient of the first step's loss alone (weighted 1/T as in train_step).
    obj.zero_grad()
    episode = fovea.episode_patches(obj.model, cfg, torch.Generator().manual_seed(0), 6, (48, 48),
                                    torch.device("cpu"))
    state = obj.model(fovea.integral_image(batch["image"]), None, episode[0])
    (F.cross_entropy(obj.model.classify(state), batch["label"]) / 3).backward()
    torch.testing.assert_close(obj.model.state_prompt.grad, full, rtol=1e-5, atol=1e-7)


def test_zoom_levels_beyond_z_max_are_refused():
    """[002] A.3.1: the position MLP sees z / Z_max in [0, 1]; geometry beyond Z_max is refused."""
    with pytest.raises(ValueError, match=r"model.max_z .* z = 5.000.*z_max = 4"):
        fovea.FovealViT(tiny_foveal(max_z=5.0, z_max=4.0))
    with pytest.raises(ValueError, match=r"model.grid_z"):
        fovea.FovealViT(tiny_foveal(grid_z=(3.0, 4.5), z_max=4.0))
    model = fovea.FovealViT(tiny_foveal(z_max=4.0))
    table = fovea.integral_image(torch.rand(1, 3, 64, 64))
    model.vit_mode(table, grid=16)                                        # z = 4: in range
    with pytest.raises(ValueError, match=r"ViT mode with a 32 x 32 grid gives zoom level z = 5"):
        model.vit_mode(table, grid=32)
    patches = model.glimpse(torch.zeros(1, 2), (64, 64))
    bad = fovea.Patches(patches.boxes, patches.yxz + torch.tensor([0.0, 0.0, 2.0]))   # z up to 5
    with pytest.raises(RuntimeError, match="zoom level is outside"):
        model(table, None, bad)


def test_a_short_training_run_lowers_the_loss():
    torch.manual_seed(0)
    cfg = fovea.FovealTrainConfig(model=tiny_foveal(), steps=3, mixup_alpha=0.0)
    obj = fovea.FovealSupervised(cfg, seed=0)
    gen = torch.Generator().manual_seed(1)
    batch = {"image": torch.randn(10, 3, 48, 48, generator=gen), "label": torch.arange(10) % 5}
    opt = torch.optim.AdamW(obj.parameters(), lr=3e-3)
    losses = []
    prompt = obj.model.state_prompt.detach().clone()
    for _ in range(30):
        losses.append(obj.train_step(batch, 0, LocalRun(opt))["loss"].item())
    assert losses[-1] < 0.5 * losses[0]
    assert (obj.model.state_prompt - prompt).abs().max() > 1e-3           # the prompt moved


# ---------------------------------------------------------------------------------------------
# The probe stage [000, Sec. 5.1]: a head on a frozen dino backbone
# ---------------------------------------------------------------------------------------------

def dino_checkpoint(path, objective="dino"):
    """A dino run's checkpoint (or another objective's) as train.py writes it."""
    import config
    import train
    cfg = train.TrainConfig()
    model = {**dataclasses.asdict(tiny_foveal(head="none", num_classes=0)), "z_max": 4.5}
    sections = {"dino": {"dino": {"model": model, "global_grid": 4, "local_grid": 2, "out_dim": 16,
                                  "hidden_dim": 24, "bottleneck_dim": 8}},
                "foveal_sup": {"foveal": {"model": dataclasses.asdict(tiny_foveal())}}}
    config.apply_overrides(cfg, {"objective": objective, **sections[objective]})
    torch.manual_seed(0)
    obj = train.build_objective(cfg)
    if objective == "dino":                     # the teacher, which is exported, apart from the student
        with torch.no_grad():
            for p in obj.teacher.parameters():
                p.add_(torch.randn_like(p))
    torch.save(train.checkpoint(cfg, obj, step=1), path)
    return obj


def test_the_probe_learns_only_its_head_on_the_dino_teacher(tmp_path):
    dino_obj = dino_checkpoint(tmp_path / "dino.pt")
    probe = fovea.FovealSupervised.probe(fovea.ProbeConfig(backbone=str(tmp_path / "dino.pt"), num_classes=5, steps=2), seed=0)
    teacher = dino_obj.teacher.backbone.state_dict()
    for k, v in probe.model.state_dict().items():              # the EMA teacher's backbone, exactly
        if not k.startswith("head."):
            assert torch.equal(v, teacher[k]), k
    trainable = [n for n, p in probe.model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("head.") for n in trainable)
    before = {k: v.clone() for k, v in probe.model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in probe.model.parameters() if p.requires_grad], lr=1e-2)
    batch = {"image": torch.randn(6, 3, 32, 32), "label": torch.arange(6) % 5}
    for step in range(3):
        probe.train_step(batch, step, LocalRun(opt))
    after = probe.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if not k.startswith("head."))
    assert any(not torch.equal(after[k], v) for k, v in before.items() if k.startswith("head."))
    again = fovea.FovealSupervised.probe(fovea.ProbeConfig(backbone=str(tmp_path / "dino.pt"), reinit=True, num_classes=5), seed=0)
    assert not torch.equal(again.model.blocks[0].qk.weight, probe.model.blocks[0].qk.weight)   # random


def test_a_probe_needs_a_dino_backbone_and_says_what_it_got(tmp_path):
    dino_checkpoint(tmp_path / "sup.pt", objective="foveal_sup")
    with pytest.raises(fovea.CheckpointError, match=r"is a 'foveal_sup' checkpoint; the probe stage takes .* 'dino'"):
        fovea.FovealSupervised.probe(fovea.ProbeConfig(backbone=str(tmp_path / "sup.pt"), num_classes=5), seed=0)
    with pytest.raises(fovea.CheckpointError, match="probe.backbone: set the checkpoint"):
        fovea.FovealSupervised.probe(fovea.ProbeConfig(num_classes=5), seed=0)
    dino_checkpoint(tmp_path / "dino.pt")
    backbone = fovea.load_frozen(tmp_path / "dino.pt", "encoder", fovea.FovealViT)
    with pytest.raises(ValueError, match="no task head .* train one with the objective `probe`"):
        backbone.classify(torch.zeros(1, 3, 32))
