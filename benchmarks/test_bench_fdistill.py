"""f-distill generator loss (js weight), forward + backward at (256, 3x64x64) and (32, 4x128x128): eager vs
torch.compile vs mmfast."""


def test_fdistill(run_benchmark, fdistill_case, dtype, provider):
    run_benchmark(fdistill_case, dtype, provider)
