"""Masked reconstruction (mse), forward + backward at N=8192, D=1024: no mask, row masks keeping 25% and
75% of the rows (the excluded rows are not read), a bool element mask; eager vs torch.compile vs mmfast."""


def test_masked_reconstruction(run_benchmark, masked_reconstruction_case, dtype, provider):
    run_benchmark(masked_reconstruction_case, dtype, provider)
