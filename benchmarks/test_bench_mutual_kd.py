"""Mutual KD (M = 3 co-trained models), forward + backward: eager vs torch.compile vs mmfast."""


def test_mutual_kd(run_benchmark, mutual_kd_case, dtype, provider):
    run_benchmark(mutual_kd_case, dtype, provider)
