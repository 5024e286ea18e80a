"""Routed teacher-mixture KD with mix "logits" and "probs", forward + backward: eager vs torch.compile vs every
mmfast backend."""


def test_routed_kd_mixes(run_benchmark, routed_kd_mixes_case, dtype, provider):
    run_benchmark(routed_kd_mixes_case, dtype, provider)
