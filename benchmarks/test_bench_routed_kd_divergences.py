"""Routed teacher-mixture KD with reverse KL, JS and TVD (mix "loss" and "logits"), forward + backward: eager vs
torch.compile vs every mmfast backend."""


def test_routed_kd_divergences(run_benchmark, routed_kd_divergences_case, dtype, provider):
    run_benchmark(routed_kd_divergences_case, dtype, provider)
