"""The one-step ring distillation recipe: the closed-form teacher, the metrics, and a tiny end-to-end run."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from mmfast.recipes import one_step_ring as ring

TEACHER = ring.RingTeacher()
TINY = dataclasses.replace(ring.RingConfig(), steps=4, fake_warmup_steps=2, batch_size=32, width=16, depth=2)


def _monte_carlo_denoise(x_t: torch.Tensor, sigma: float, n: int, seed: int):
    """Self-normalised importance estimate of E[x0 | x_t] from n teacher samples: weights N(x_t; x0, sigma^2 I).

    Returns the estimate, its standard error per coordinate (delta method) and the effective sample size."""
    x0 = TEACHER.sample(n, torch.Generator().manual_seed(seed)).double()
    log_w = -0.5 * (x_t.double() - x0).square().sum(1) / sigma**2
    w = torch.softmax(log_w, dim=0)
    estimate = (w[:, None] * x0).sum(0)
    std_error = (w[:, None].square() * (x0 - estimate).square()).sum(0).sqrt()
    return estimate, std_error, float(1.0 / w.square().sum())


@pytest.mark.parametrize(
    ("point", "sigma"),
    [
        ((2.05, 0.08), 0.05),    # next to mode 0, noise below the mode's std
        ((1.6, 0.9), 0.3),       # between modes 0 and 1
        ((0.3, -0.2), 1.0),      # inside the ring: the posterior mixes several modes
        ((4.0, 3.0), 3.0),       # outside the ring, large noise
    ],
)
def test_closed_form_denoiser_matches_monte_carlo(point, sigma):
    x_t = torch.tensor([point], dtype=torch.float64)
    exact = TEACHER.denoise(x_t, torch.tensor([sigma], dtype=torch.float64))[0]
    estimate, std_error, ess = _monte_carlo_denoise(x_t[0], sigma, 400_000, seed=7)
    assert ess > 2_000  # enough samples carry weight for the error estimate to hold
    assert bool((std_error < 0.02).all())  # and the check below is sharp
    assert bool(((exact - estimate).abs() <= 5 * std_error + 1e-4).all()), (exact, estimate, std_error)


def test_denoiser_is_tweedie_of_the_noised_density():
    """E[x0 | x_t] = x_t + sigma^2 grad log p_sigma(x_t), p_sigma the mixture with variance std^2 + sigma^2."""
    x_t = (torch.randn(64, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2.5)
    sigma = torch.linspace(0.01, 5.0, 64, dtype=torch.float64)
    x = x_t.clone().requires_grad_(True)
    var = (TEACHER.std**2 + sigma**2)[:, None]
    log_p = torch.logsumexp(-0.5 * (x[:, None, :] - TEACHER.centres(torch.float64)).square().sum(-1) / var, dim=1)
    (score,) = torch.autograd.grad(log_p.sum(), x)
    torch.testing.assert_close(TEACHER.denoise(x_t, sigma), x_t + sigma[:, None] ** 2 * score)


def test_denoiser_is_finite_far_from_the_ring():
    x_t = torch.tensor([[1e3, -1e3], [0.0, 0.0], [-50.0, 3.0]])
    out = TEACHER.denoise(x_t, torch.tensor([1e-3, 1e-3, 1e-2]))
    assert torch.isfinite(out).all()
    # far out, the nearest component (mode 4, at (-2, 0)) takes all the posterior: its mean given x_t
    mu, shrink = TEACHER.centres()[4], TEACHER.std**2 / (TEACHER.std**2 + 1e-2**2)
    torch.testing.assert_close(out[2], mu + shrink * (x_t[2] - mu))


def test_teacher_samples_lie_on_the_modes():
    samples = TEACHER.sample(20_000, torch.Generator().manual_seed(0))
    fractions = ring.mode_fractions(samples, TEACHER.centres())
    torch.testing.assert_close(fractions, torch.full((8,), 1 / 8, dtype=torch.float64), atol=0.01, rtol=0)
    assert ring.off_mode_fraction(samples, TEACHER.centres(), 4 * TEACHER.std) < 0.002
    assert samples.std(0).mean().item() == pytest.approx(TEACHER.sigma_data, rel=0.02)


def test_metrics_on_hand_built_sample_sets():
    centres = TEACHER.centres()
    at_one_mode = centres[3].expand(1000, 2) + 0.01 * torch.randn(1000, 2, generator=torch.Generator().manual_seed(1))
    assert ring.modes_covered(at_one_mode, centres) == 1
    assert ring.modes_covered(at_one_mode, centres, max_distance=0.4) == 1
    assert ring.off_mode_fraction(at_one_mode, centres, 0.4) == 0.0

    on_every_mode = centres.repeat(125, 1)
    assert ring.modes_covered(on_every_mode, centres) == 8
    # 7 modes hold 1/8 each, one holds 1% (< 2%): 7 covered
    uneven = torch.cat([centres[:7].repeat(141, 1), centres[7:].expand(10, 2)])
    assert ring.modes_covered(uneven, centres) == 7

    # a blurred ring through every mode: all 8 modes are nearest centres, none is hit within 4 std
    angle = torch.linspace(0, 2 * math.pi, 8001)[:-1] + math.pi / 8
    between = TEACHER.radius * torch.stack([angle.cos(), angle.sin()], 1)
    between = between[torch.cdist(between, centres).amin(1) > 0.4]
    assert ring.modes_covered(between, centres) == 8
    assert ring.modes_covered(between, centres, max_distance=0.4) == 0
    assert ring.off_mode_fraction(between, centres, 0.4) == 1.0

    metrics = ring.sample_metrics(at_one_mode, TEACHER.sample(1000, torch.Generator().manual_seed(2)), TEACHER)
    assert metrics["modes_covered"] == 1 and metrics["modes_near_centre"] == 1
    assert sum(metrics["mode_fractions"]) == pytest.approx(1.0)


def test_energy_distance():
    x = TEACHER.sample(3000, torch.Generator().manual_seed(4))
    assert ring.energy_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    assert ring.energy_distance(x, x.flip(0)) == pytest.approx(0.0, abs=1e-9)  # order does not matter
    # two point masses d apart: 2 d - 0 - 0
    origin, far = torch.zeros(50, 2), torch.tensor([[3.0, 4.0]]).expand(70, 2)
    assert ring.energy_distance(origin, far) == pytest.approx(10.0, rel=1e-9)
    # two independent teacher sets are close, a shifted set is not
    y = TEACHER.sample(3000, torch.Generator().manual_seed(5))
    assert 0.0 <= ring.energy_distance(x, y) < 0.01
    assert ring.energy_distance(x, y + 0.5) > 0.1


def test_tiny_run_writes_table_plot_and_metrics(tmp_path):
    pytest.importorskip("matplotlib")
    results = ring.run_one_step_ring(tmp_path, divergences=["js"], config=TINY, n_eval=400, progress=False)
    assert [(r.form, r.divergence) for r in results.runs] == [("fdistill", "js"), ("uni_instruct", "js")]
    for run in results.runs:
        assert run.samples.shape == (400, 2) and torch.isfinite(run.samples).all()
        m = run.metrics
        assert 0 <= m["modes_near_centre"] <= m["modes_covered"] <= 8
        assert math.isfinite(m["energy_distance"]) and m["energy_distance"] >= 0
        assert m["steps"] == TINY.steps and m["time_s"] > 0
        assert all(math.isfinite(v) for v in m["final_losses"].values())
    table = (tmp_path / "results.md").read_text()
    assert "| fdistill/js | f-distill | js |" in table and "| uni_instruct/js | Uni-Instruct | js |" in table
    assert "noise floor" in table and "torch" in table
    assert (tmp_path / "ring_js.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["run"] for r in saved["runs"]] == ["fdistill/js", "uni_instruct/js"]
    assert saved["teacher"]["std"] == TEACHER.std and saved["config"]["steps"] == TINY.steps


def test_extra_runs_and_the_recorded_command():
    results = ring.run_one_step_ring(None, ["kl"], ["fdistill"], config=TINY, n_eval=200, progress=False,
                                     extra_runs=[("uni_instruct_no_di", "js")])
    assert [r.name for r in results.runs] == ["fdistill/kl", "uni_instruct_no_di/js"]
    assert results.command.startswith("run_one_step_ring(...) with a custom RingConfig")
    default = ring.run_one_step_ring(None, ["kl"], ["fdistill"], quick=True, steps=1, n_eval=100, progress=False)
    assert default.command == ("python -m mmfast.recipes.one_step_ring --out DIR --divergences kl --forms fdistill "
                               "--steps 1 --seed 0 --n-eval 100 --quick")


def test_runs_are_reproducible():
    first = ring.run_one_step_ring(None, ["reverse_kl"], ["uni_instruct"], config=TINY, n_eval=200, progress=False)
    second = ring.run_one_step_ring(None, ["reverse_kl"], ["uni_instruct"], config=TINY, n_eval=200, progress=False)
    torch.testing.assert_close(first.runs[0].samples, second.runs[0].samples, rtol=0, atol=0)


def test_training_moves_the_generator():
    torch.manual_seed(0)
    before = ring.Generator(TINY.latent_dim, TINY.width, TINY.depth).state_dict()
    gen, log = ring.train_one_step_generator(TEACHER, "kl", "fdistill", TINY, seed=0, progress=False)
    assert any(not torch.equal(before[k], v) for k, v in gen.state_dict().items())
    assert log["steps"] == TINY.steps


def test_cli(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    code = ring.main(["--out", str(tmp_path), "--quick", "--steps", "2", "--divergences", "kl", "--forms",
                      "fdistill", "--n-eval", "300", "--no-progress", "--extra-runs", "uni_instruct_no_di/kl"])
    assert code == 0
    out = capsys.readouterr().out
    assert "fdistill/kl" in out and "uni_instruct_no_di/kl" in out
    with pytest.raises(SystemExit):
        ring.main(["--out", str(tmp_path), "--extra-runs", "fdistill-kl"])
    assert (tmp_path / "ring_kl.png").exists() and (tmp_path / "results.md").exists()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"divergences": ["kl", "tv"]}, "divergences"),
        ({"forms": ["dmd"]}, "forms"),
        ({"divergences": []}, "divergences"),
        ({"extra_runs": [("uni_instruct", "chi")]}, "extra_runs"),
        ({"extra_runs": [("kl",)]}, "extra_runs"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ring.run_one_step_ring(None, **({"config": TINY, "progress": False} | kwargs))
