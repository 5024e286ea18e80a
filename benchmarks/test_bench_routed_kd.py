"""Routed teacher-mixture KD, forward + backward: eager vs torch.compile vs every mmfast backend."""


def test_routed_kd(run_benchmark, routed_kd_case, dtype, provider):
    run_benchmark(routed_kd_case, dtype, provider)
