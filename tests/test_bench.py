"""bench.py: the saved-tensor meter against hand-counted bytes; the extraction table's methods."""
import torch

import bench
import fovea


def test_saved_tensor_meter_counts_what_autograd_keeps_for_backward():
    """Hand count: x * x saves x twice (one storage: counted once); exp saves its result (a new
    storage); x @ w saves x and w, but w is a parameter (excluded). Every byte is given back
    once the backward has used it, and the peak stays that of the largest graph."""
    x = torch.randn(1000, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(1000, 3))
    meter = bench.SavedTensorMeter(exclude=[w])
    with meter:
        y = (x * x).exp()                                  # x (4000 B) + exp's output (4000 B)
        assert meter.live == 8000
        z = x @ w                                          # x again (already held), w excluded
        assert meter.live == 8000
        (y.sum() + z.sum()).backward()
        assert meter.live == 0 and meter.peak == 8000
        meter.reset()
        for _ in range(3):                                 # truncated BPTT: one chunk at a time
            x.detach().requires_grad_().exp().sum().backward()
        assert meter.live == 0 and meter.peak == 4000


def test_the_extraction_benchmark_times_the_same_glimpse_by_each_method():
    """The table's columns time one operation: its bilinear column samples the boxes as CanViT's
    glimpse does, and its crop-and-resize column gives the box filter's patches where both are
    exact (a box of whole pixels at its own size); the row the README's table prints runs."""
    gen = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 64, 64, generator=gen)
    centre, scale = torch.rand(2, 2, generator=gen) - 0.5, torch.tensor([0.5, 0.75])
    boxes = fovea.viewpoint_boxes(centre, scale, (64, 64))[:, None]                 # (2, 1, 4)
    torch.testing.assert_close(bench.bilinear_boxes(img, boxes, 16)[:, 0],
                               fovea.bilinear_glimpse(img, centre, scale, 16), rtol=1e-5, atol=1e-6)
    whole = torch.tensor([[[8.0, 12.0, 24.0, 28.0]]]).expand(2, 1, 4)               # 16 px, factor 1
    torch.testing.assert_close(bench.crop_resize(img, whole, 16),
                               fovea.box_patches(fovea.integral_image(img), whole, 16, compiled=False))
    row = bench.extraction_row(torch.device("cpu"), 64, repeats=1)
    assert set(row) == {"side", "integral_ms", "integral_table_ms", "bilinear_ms", "naive_ms"}
