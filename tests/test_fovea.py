"""fovea.py: extraction against independent computations, and the top-down geometry."""
import math

import pytest
import torch
import torch.nn.functional as F

import fovea
from conftest import load_reference


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
    assert table.shape == (1, 1, 4097, 4097) and table.dtype == torch.float64
    assert (table[..., 0, :] == 0).all() and (table[..., :, 0] == 0).all()
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
    assert table.dtype == torch.int64
    assert torch.equal(table[:, :, 1:, 1:], img.long().cumsum(2).cumsum(3))
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
    # (2) Any image with values in [0, 1]: |mean_R - mean_E| <= 2 |R xor E| / |R| with
    # |R xor E| <= hy + hx + 2 and |R| >= (hy - 1)(hx - 1) for a cell of hy x hx pixels.
    noise = torch.rand(1, 3, H, W, generator=gen)
    table = fovea.integral_image(noise)
    exact = fovea.box_patches(table, boxes, p, exact=True, compiled=False)
    near = fovea.box_patches(table, boxes, p, exact=False, compiled=False)
    h = side[0, :, 0] / p                                          # cell side, px
    bound = 2 * (2 * h + 2) / (h - 1) ** 2                         # (50,)
    worst = (near - exact).abs().amax((2, 3, 4))[0]
    assert (worst <= bound).all()


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
        g = fovea.bilinear_glimpse(ref["scene"], step["viewpoint_center_yx"], step["viewpoint_scale"],
                                   ref["glimpse_px"])
        torch.testing.assert_close(g, step["glimpse"], rtol=0, atol=1e-6)


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


def test_paper002_coordinate_conversion():
    xy = torch.tensor([[0.0, 0.0], [1.0, 0.25], [0.5, 0.5]])
    yx = fovea.from_paper002(xy)
    torch.testing.assert_close(yx, torch.tensor([[-1.0, -1.0], [-0.5, 1.0], [0.0, 0.0]]))
    torch.testing.assert_close(fovea.to_paper002(yx), xy)
    # Alg. 1: centre_y = center[1] * height, centre_x = center[0] * width.
    pt = fovea.multizoom_patches(yx, (200, 100), num_patches=2, max_z=1.0)
    cy, cx = centres_px(pt.boxes)
    torch.testing.assert_close(cy[:, 0], xy[:, 1] * 200)
    torch.testing.assert_close(cx[:, 0], xy[:, 0] * 100)
    assert fovea.zoom_to_scale(2.0) == 0.25 and fovea.scale_to_zoom(0.125) == 3.0


@pytest.mark.parametrize("g", [1, 2, 5])
def test_foveal_grid_is_centred_as_in_eq6(g):
    H, W = 256, 384
    gaze = torch.tensor([[0.1, 0.3], [-0.5, -0.2]])
    z = torch.tensor([3.0, 4.5])
    pt = fovea.foveal_grid(gaze, (H, W), grid=g, z=z)
    S = 256 / 2 ** z                                              # Eq. 5
    cy, cx = centres_px(pt.boxes)                                 # (B, g*g)
    gy, gx = (gaze[:, 0] + 1) / 2 * H, (gaze[:, 1] + 1) / 2 * W
    i, j = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    torch.testing.assert_close(cy, gy[:, None] + (i.reshape(-1) - (g - 1) / 2) * S[:, None])  # Eq. 6
    torch.testing.assert_close(cx, gx[:, None] + (j.reshape(-1) - (g - 1) / 2) * S[:, None])
    torch.testing.assert_close(pt.boxes[..., 2] - pt.boxes[..., 0], S[:, None].expand(2, g * g))
    # The grid spans g * S around the gaze, and the positions carry the patch centres.
    torch.testing.assert_close(pt.boxes[..., 3].amax(1) - pt.boxes[..., 1].amin(1), g * S)
    torch.testing.assert_close(pt.yxz[..., 0], cy / H * 2 - 1)
    torch.testing.assert_close(pt.yxz[..., 2], z[:, None].expand(2, g * g))


def test_foveal_context_has_a_fixed_token_count():
    for size in [(64, 64), (1000, 700)]:
        pt = fovea.foveal_context(torch.zeros(3, 2), size, num_zoom=16, max_z=4.0, grid=5, grid_z=4.0)
        assert pt.boxes.shape == (3, 16 + 25, 4)


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
    s1 = model.step(table, model.init_state(2), torch.tensor([[0.1, 0.2], [-0.3, 0.4]]))
    reached = []
    s1.register_hook(lambda g: reached.append(g))
    s2 = model.step(table, s1, torch.tensor([[-0.5, 0.0], [0.6, -0.6]]))
    model.classify(s2).sum().backward()
    assert not reached                                      # step 2's loss stops at its input
    assert model.blocks[0].qk.weight.grad.abs().sum() > 0   # and still trains step 2


def test_token_count_and_step_cost_do_not_depend_on_the_image_size():
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    model = fovea.FovealViT(tiny_foveal())
    gaze = torch.tensor([[0.2, -0.1]])
    flops, tokens = [], []
    for side in (64, 1024):
        table = fovea.integral_image(torch.randn(1, 3, side, side))
        tokens.append(model.embed(table, model.glimpse(gaze, (side, side))).shape)
        with FlopCounterMode(display=False) as fc:
            model.step(table, model.init_state(1), gaze)
        flops.append(fc.get_total_flops())
    assert tokens[0] == tokens[1] == (1, 4 + 4, 32)
    assert flops[0] == flops[1] > 0


def test_vit_mode_equals_an_independent_forward_on_pixel_patches():
    """On a 64 px image a 4 x 4 grid is exactly the 16 px pixel patches of a ViT."""
    torch.manual_seed(0)
    model = fovea.FovealViT(tiny_foveal(z_scale=2.0)).eval()
    img = torch.randn(2, 3, 64, 64)
    got = model.vit_mode(fovea.integral_image(img), grid=4)
    pix = F.unfold(img, 16, stride=16).transpose(1, 2)                      # (B, 16, 3*16*16)
    c = (torch.arange(4) + 0.5) / 4                                         # centres in [0, 1]
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    xyz = torch.stack([xx.reshape(-1), yy.reshape(-1), torch.full((16,), 2.0 / 2.0)], -1)
    tokens = model.patch_embed(pix) + model.pos_mlp(xyz)
    state = model.state_prompt.expand(2, -1, -1)
    x = torch.cat([state, tokens], 1)
    q = F.pad(state, (0, 0, 0, 16))
    for blk in model.blocks:
        x = blk(x, q)
    torch.testing.assert_close(got, model.norm(x[:, :3]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head", ["combine_mlp", "linear", "transformer"])
def test_heads(head):
    torch.manual_seed(0)
    model = fovea.FovealViT(tiny_foveal(head=head))
    state = torch.randn(4, 3, 32)
    assert model.classify(state).shape == (4, 5)
    if head == "linear":                                   # [000]: the first state token only
        other = state.clone()
        other[:, 1:] = torch.randn(4, 2, 32)
        torch.testing.assert_close(model.classify(state), model.classify(other))
    with pytest.raises(ValueError, match="unknown head"):
        fovea.FovealViT(tiny_foveal(head="mean"))


def test_mixup_mixes_labels_as_it_mixes_images():
    labels = torch.tensor([0, 3, 1, 4])
    images = labels.float()[:, None, None, None].expand(4, 3, 8, 8)       # image value = its label
    mixed, target = fovea.mixup(images, labels, 5, lam=0.3)
    expected_label = (target * torch.arange(5.0)).sum(-1)                   # E[label] under the target
    torch.testing.assert_close(mixed[:, 0, 0, 0], expected_label)
    torch.testing.assert_close(target.sum(-1), torch.ones(4))
    assert target[0, 0] == pytest.approx(0.3) and target[0, 4] == pytest.approx(0.7)


def test_shuffled_vit_episode_shows_every_patch_once():
    cfg = fovea.FovealTrainConfig(model=tiny_foveal(grid=0), steps=4, glimpse="shuffled_vit", vit_grid=16)
    obj = fovea.FovealSupervised(cfg, seed=0)
    groups = obj.episode_patches(torch.Generator().manual_seed(0), 2, (256, 256), torch.device("cpu"))
    assert len(groups) == 4 and all(g.boxes.shape == (2, 64, 4) for g in groups)
    boxes = torch.cat([g.boxes for g in groups], 1)                         # (2, 256, 4)
    for b in range(2):
        got = sorted(map(tuple, boxes[b].tolist()))
        assert got == sorted(map(tuple, fovea.vit_grid(1, (256, 256), 16).boxes[0].tolist()))
        assert (boxes[b, :64] != fovea.vit_grid(1, (256, 256), 16).boxes[0, :64]).any()   # shuffled
    assert (groups[0].boxes[0] != groups[0].boxes[1]).any()                 # per image


def test_a_short_training_run_lowers_the_loss():
    import contextlib
    torch.manual_seed(0)
    cfg = fovea.FovealTrainConfig(model=tiny_foveal(), steps=3, mixup_alpha=0.0)
    obj = fovea.FovealSupervised(cfg, seed=0)
    gen = torch.Generator().manual_seed(1)
    batch = {"image": torch.randn(10, 3, 48, 48, generator=gen), "label": torch.arange(10) % 5}
    opt = torch.optim.AdamW(obj.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        losses.append(obj.train_step(batch, 0, contextlib.nullcontext)["loss"].item())
        opt.step()
        opt.zero_grad()
    assert losses[-1] < 0.5 * losses[0]
