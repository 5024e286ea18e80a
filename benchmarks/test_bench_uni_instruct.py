"""Uni-Instruct generator loss (jeffreys, fgm + di, gradients to x, teacher_x0 and fake_x0), forward +
backward at (256, 3x64x64) and (32, 4x128x128): eager vs torch.compile vs mmfast."""


def test_uni_instruct(run_benchmark, uni_instruct_case, dtype, provider):
    run_benchmark(uni_instruct_case, dtype, provider)
