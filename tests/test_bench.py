"""bench.py: the saved-tensor meter against hand-counted bytes, and the tables print."""
import torch

import bench


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


def test_the_benchmarks_print_their_tables(capsys):
    bench.main(["extraction", "--sizes", "64", "96", "--repeats", "1", "--device", "cpu"])
    bench.main(["data", "--sizes", "32", "--n", "2", "--workers", "0"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows] == ["image side", "64", "96", "scene side (px)",
                                                       "32", "DataLoader, 128 px, batches of 64",
                                                       "0 workers, 1024 scenes"], rows
