"""One-step diffusion distillation of a 2-D ring of Gaussians with the f-divergence losses (SPEC section 3).

The teacher is a mixture of ``n_modes`` isotropic Gaussians (std ``std``) with centres evenly spaced on a circle of
radius ``radius``, noised along the EDM forward process x_t = x0 + sigma * eps. Its x0-prediction is exact:

    p(k | x_t, sigma) = softmax_k( -||x_t - mu_k||^2 / (2 (std^2 + sigma^2)) )
    E[x0 | x_t, sigma] = sum_k p(k | x_t, sigma) (mu_k + std^2 / (std^2 + sigma^2) (x_t - mu_k))

A one-step generator x0 = G(z) is distilled from it: per step, a fake-score network b(x_t, sigma) (EDM
preconditioned MLP) is fitted to the generator's samples with :func:`mmfast.fake_score_loss`, a discriminator head on
its features separates noised teacher samples from noised generator samples (:func:`mmfast.discriminator_loss`, so
the logit estimates log p_t(x_t) / q_t(x_t)), and then the generator takes one step on either

- the f-distill form: :class:`mmfast.nn.FDistillLoss` (h = fdiv_weight(density_ratio(logits)), normalised by its
  batch mean), a DMD-style update of x along the score difference; or
- the Uni-Instruct form: :class:`mmfast.nn.UniInstructLoss` (SiD-family loss whose gradient flows through the
  teacher's and the fake score's x0-predictions into x_t); ``uni_instruct_no_di`` is the same with ``di=False``.

Metrics on ``n_eval`` generator samples: modes covered (a mode counts when at least ``min_mode_fraction`` of the
samples are nearest to its centre), the fraction of samples farther than ``off_mode_stds`` teacher stds from every
centre, and the energy distance to ``n_eval`` teacher samples; the energy distance between two independent teacher
sample sets is the noise floor.

Command line: ``python -m mmfast.recipes.one_step_ring --out DIR [--quick] [--steps N] [--divergences ...]
[--forms ...] [--extra-runs FORM/DIVERGENCE ...]``; from Python: :func:`run_one_step_ring`. The measured results
and what they show are in ``docs/one_step_ring/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

import mmfast

FORMS = ("fdistill", "uni_instruct", "uni_instruct_no_di")
DEFAULT_FORMS = ("fdistill", "uni_instruct")
FORM_TITLES = {"fdistill": "f-distill", "uni_instruct": "Uni-Instruct", "uni_instruct_no_di": "Uni-Instruct, di=False"}
DEFAULT_DIVERGENCES = ("reverse_kl", "kl", "js", "jeffreys")
ALL_DIVERGENCES = (
    "reverse_kl", "softened_reverse_kl", "js", "squared_hellinger", "kl", "jeffreys", "neyman_chi2", "pearson_chi2",
)


# ---------------------------------------------------------------------------------------------------------------
# teacher


@dataclasses.dataclass(frozen=True)
class RingTeacher:
    """A mixture of ``n_modes`` equally weighted Gaussians N(mu_k, std^2 I) with mu_k on a circle of ``radius``.

    Mode k sits at angle 2 pi k / n_modes. With radius 2 and std 0.1 neighbouring centres are
    2 radius sin(pi / n_modes) = 1.53 apart (15 stds): the modes are cleanly separated, and a sample between two
    of them is far (> 4 stds) from both. (std 0.05 is as meaningful but needs several times more generator steps
    before the samples between modes drain away, beyond a few-minute CPU budget.)
    """

    n_modes: int = 8
    radius: float = 2.0
    std: float = 0.1

    @property
    def sigma_data(self) -> float:
        """Per-coordinate standard deviation of the data, sqrt(radius^2 / 2 + std^2) (EDM's sigma_data)."""
        return math.sqrt(self.radius**2 / 2 + self.std**2)

    def centres(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
        """Mode centres mu_k, [n_modes, 2]."""
        angle = torch.arange(self.n_modes, dtype=torch.float64) * (2 * math.pi / self.n_modes)
        return (self.radius * torch.stack([angle.cos(), angle.sin()], dim=1)).to(dtype=dtype, device=device)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n samples x0 [n, 2] (float32): a uniform mode, plus std * N(0, I)."""
        k = torch.randint(self.n_modes, (n,), generator=generator)
        return self.centres()[k] + self.std * torch.randn(n, 2, generator=generator)

    def denoise(self, x_t: Tensor, sigma: Tensor) -> Tensor:
        """Closed-form x0-prediction E[x0 | x_t, sigma] for x_t = x0 + sigma * eps; x_t [B, 2], sigma [B] or [B, 1].

        Differentiable in x_t (the Uni-Instruct form back-propagates through it).
        """
        sigma = sigma.reshape(-1, 1).to(x_t.dtype)
        mu = self.centres(x_t.dtype, x_t.device)                              # [K, 2]
        var = self.std**2 + sigma**2                                          # [B, 1] variance of x_t given k
        diff = x_t.unsqueeze(1) - mu                                          # [B, K, 2]
        log_like = -0.5 * diff.square().sum(-1) / var                         # [B, K] (shared terms dropped)
        posterior = torch.softmax(log_like, dim=1)                            # stable: max-subtracted softmax
        shrink = (self.std**2 / var).unsqueeze(1)                             # [B, 1, 1]
        component_mean = mu + shrink * diff                                   # E[x0 | x_t, k]
        return (posterior.unsqueeze(-1) * component_mean).sum(1)


# ---------------------------------------------------------------------------------------------------------------
# networks


@dataclasses.dataclass(frozen=True)
class RingConfig:
    """Hyperparameters of one distillation run (the defaults are the ones behind ``docs/one_step_ring``).

    Attributes:
        steps: alternating steps (one fake-score + discriminator update, then one generator update).
        batch_size: samples per update (generator samples; as many teacher samples for the discriminator).
        latent_dim: dimension of the generator's input z ~ N(0, I).
        width, depth: hidden width and number of hidden layers of every MLP (SiLU activations).
        generator_lr, fake_lr: Adam learning rates of the generator and of the fake score + discriminator.
        adam_betas: Adam betas for both optimisers (beta1 = 0 as in SiD/DMD's alternating updates).
        fake_warmup_steps: fake-score + discriminator updates on the initial generator before the first
            generator step (the fake score cannot be initialised from the teacher here).
        fake_updates_per_step: fake-score + discriminator updates per generator update.
        discriminator_weight: weight of :func:`mmfast.discriminator_loss` next to the fake-score loss (the head
            and the shared trunk are trained together, as in f-distill).
        sigma_log_mean, sigma_log_std: log sigma ~ N(mean, std^2) (EDM's log-normal), clipped to
            [sigma_min, sigma_max], for the fake score, the discriminator and the generator.
        alpha, fgm, di: :class:`mmfast.nn.UniInstructLoss` options (the Uni-Instruct form only).
        logit_clamp, ratio_min, ratio_max: :func:`mmfast.density_ratio` clamps.
        normalize_h: divide h by its batch mean (f-distill form).
    """

    steps: int = 2000
    batch_size: int = 256
    latent_dim: int = 4
    width: int = 128
    depth: int = 3
    generator_lr: float = 1e-3
    fake_lr: float = 1e-3
    adam_betas: tuple[float, float] = (0.0, 0.99)
    fake_warmup_steps: int = 200
    fake_updates_per_step: int = 1
    discriminator_weight: float = 1.0
    sigma_log_mean: float = -1.0
    sigma_log_std: float = 1.2
    sigma_min: float = 0.01
    sigma_max: float = 10.0
    alpha: float = 1.0
    fgm: bool = False
    di: bool = True
    logit_clamp: float = 10.0
    ratio_min: float = 0.1
    ratio_max: float = 20.0
    normalize_h: bool = True


QUICK_CONFIG = dataclasses.replace(RingConfig(), steps=300, fake_warmup_steps=50)


def _mlp(in_dim: int, width: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(in_dim if i == 0 else width, width), nn.SiLU()]
    return nn.Sequential(*layers)


class Generator(nn.Module):
    """One-step generator x0 = G(z): an MLP from z ~ N(0, I_latent_dim) to the plane."""

    def __init__(self, latent_dim: int = 4, width: int = 128, depth: int = 3) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.trunk = _mlp(latent_dim, width, depth)
        self.out = nn.Linear(width, 2)

    def forward(self, z: Tensor) -> Tensor:
        return self.out(self.trunk(z))


class FakeScore(nn.Module):
    """EDM-preconditioned x0-predictor b(x_t, sigma) with a discriminator head on its trunk's features.

    b = c_skip x_t + c_out F(c_in x_t, c_noise), c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 +
    sd^2), c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = log(sigma) / 4 fed through sin/cos features. The head maps the
    trunk features (the last hidden layer) to one logit.
    """

    n_frequencies = 6

    def __init__(self, sigma_data: float, width: int = 128, depth: int = 3) -> None:
        super().__init__()
        self.sigma_data = sigma_data
        self.trunk = _mlp(2 + 1 + 2 * self.n_frequencies, width, depth)
        self.out = nn.Linear(width, 2)
        self.head = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))
        self.register_buffer("frequencies", math.pi * 2.0 ** torch.arange(self.n_frequencies), persistent=False)

    def features(self, x_t: Tensor, sigma: Tensor) -> Tensor:
        """Trunk features [B, width] of x_t at noise level sigma [B]."""
        sigma = sigma.reshape(-1, 1)
        c_in = (sigma**2 + self.sigma_data**2).rsqrt()
        c_noise = sigma.log() / 4
        angles = c_noise * self.frequencies
        return self.trunk(torch.cat([c_in * x_t, c_noise, angles.sin(), angles.cos()], dim=1))

    def denoise(self, x_t: Tensor, sigma: Tensor, features: Tensor) -> Tensor:
        """x0-prediction b from the trunk features of (x_t, sigma)."""
        sigma = sigma.reshape(-1, 1)
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data * (sigma**2 + sd2).rsqrt()
        return c_skip * x_t + c_out * self.out(features)

    def forward(self, x_t: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """(x0-prediction [B, 2], discriminator logits [B])."""
        h = self.features(x_t, sigma)
        return self.denoise(x_t, sigma, h), self.head(h).squeeze(1)


# ---------------------------------------------------------------------------------------------------------------
# metrics


def mode_fractions(samples: Tensor, centres: Tensor, max_distance: float | None = None) -> Tensor:
    """Fraction of the samples [N, 2] whose nearest centre is each of centres [K, 2], [K] (float64).

    With ``max_distance``, a sample counts only when it is within that distance of its nearest centre (the
    fractions then sum to 1 - the off-mode fraction).
    """
    distance = torch.cdist(samples.double(), centres.double())
    nearest_distance, nearest = distance.min(dim=1)
    if max_distance is not None:
        nearest = nearest[nearest_distance <= max_distance]
    return torch.bincount(nearest, minlength=centres.shape[0]).double() / samples.shape[0]


def modes_covered(samples: Tensor, centres: Tensor, min_fraction: float = 0.02,
                  max_distance: float | None = None) -> int:
    """Number of modes that are the nearest centre of at least ``min_fraction`` of the samples (counting only
    samples within ``max_distance`` of it when given)."""
    return int((mode_fractions(samples, centres, max_distance) >= min_fraction).sum())


def off_mode_fraction(samples: Tensor, centres: Tensor, max_distance: float) -> float:
    """Fraction of the samples farther than ``max_distance`` from every centre."""
    nearest_distance = torch.cdist(samples.double(), centres.double()).amin(dim=1)
    return float((nearest_distance > max_distance).double().mean())


def _mean_distance(x: Tensor, y: Tensor, chunk: int = 2048) -> float:
    total = 0.0
    for i in range(0, x.shape[0], chunk):
        block = torch.cdist(x[i:i + chunk], y, compute_mode="donot_use_mm_for_euclid_dist")
        total += float(block.sum(dtype=torch.float64))
    return total / (x.shape[0] * y.shape[0])


def energy_distance(x: Tensor, y: Tensor) -> float:
    """Energy distance 2 E||X - Y|| - E||X - X'|| - E||Y - Y'|| between sample sets x [N, d] and y [M, d].

    The V-statistic (all pairs, the zero self-distances included): >= 0, and exactly 0 for identical sets.
    """
    x, y = x.double(), y.double()
    return 2 * _mean_distance(x, y) - _mean_distance(x, x) - _mean_distance(y, y)


def sample_metrics(samples: Tensor, reference: Tensor, teacher: RingTeacher, min_mode_fraction: float = 0.02,
                   off_mode_stds: float = 4.0) -> dict:
    """Metrics of samples [N, 2] against reference (teacher) samples:

    ``modes_covered`` (modes that are the nearest centre of >= ``min_mode_fraction`` of the samples),
    ``modes_near_centre`` (the same, counting only samples within ``off_mode_stds`` teacher stds of the centre:
    a blurred ring that passes through every mode covers all of them by the first count, not by this one),
    ``mode_fractions`` (nearest-centre shares), ``off_mode_fraction`` (farther than ``off_mode_stds`` stds from
    every centre) and ``energy_distance`` to the reference samples.
    """
    centres = teacher.centres()
    fractions = mode_fractions(samples, centres)
    radius = off_mode_stds * teacher.std
    return {
        "modes_covered": int((fractions >= min_mode_fraction).sum()),
        "modes_near_centre": modes_covered(samples, centres, min_mode_fraction, radius),
        "mode_fractions": [round(float(f), 5) for f in fractions],
        "off_mode_fraction": off_mode_fraction(samples, centres, radius),
        "energy_distance": energy_distance(samples, reference),
    }


# ---------------------------------------------------------------------------------------------------------------
# training


def _sample_sigma(n: int, config: RingConfig, generator: torch.Generator) -> Tensor:
    log_sigma = config.sigma_log_mean + config.sigma_log_std * torch.randn(n, generator=generator)
    return log_sigma.exp().clamp(config.sigma_min, config.sigma_max)


def _generator_loss_module(form: str, divergence: str, config: RingConfig) -> nn.Module:
    if form == "fdistill":
        return mmfast.nn.FDistillLoss(divergence=divergence, normalize=config.normalize_h)
    if form in ("uni_instruct", "uni_instruct_no_di"):
        di = config.di and form == "uni_instruct"
        return mmfast.nn.UniInstructLoss(divergence=divergence, alpha=config.alpha, fgm=config.fgm, di=di)
    raise ValueError(f"form must be one of {FORMS}, got {form!r}")


def _density_ratio(logits: Tensor, config: RingConfig) -> Tensor:
    return mmfast.density_ratio(logits, logit_clamp=config.logit_clamp, ratio_min=config.ratio_min,
                                ratio_max=config.ratio_max)


def train_one_step_generator(
    teacher: RingTeacher,
    divergence: str,
    form: str,
    config: RingConfig = RingConfig(),
    seed: int = 0,
    progress: bool = True,
) -> tuple[Generator, dict]:
    """Distil ``teacher`` into a one-step generator with one divergence and one form; returns (generator, log).

    The log holds the wall time of the training loop (seconds), the steps, and the last step's losses.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if divergence not in ALL_DIVERGENCES:
        raise ValueError(f"divergence must be one of {ALL_DIVERGENCES}, got {divergence!r}")
    torch.manual_seed(seed)
    rng = torch.Generator().manual_seed(seed + 1)
    gen = Generator(config.latent_dim, config.width, config.depth)
    fake = FakeScore(teacher.sigma_data, config.width, config.depth)
    gen_opt = torch.optim.Adam(gen.parameters(), lr=config.generator_lr, betas=config.adam_betas)
    fake_opt = torch.optim.Adam(fake.parameters(), lr=config.fake_lr, betas=config.adam_betas)
    gen_loss_fn = _generator_loss_module(form, divergence, config)
    n = config.batch_size
    losses = {"fake_score": math.nan, "discriminator": math.nan, "generator": math.nan}

    def fake_step() -> None:
        with torch.no_grad():
            x = gen(torch.randn(n, config.latent_dim, generator=rng))
        sigma = _sample_sigma(n, config, rng)
        x_t = x + sigma[:, None] * torch.randn(n, 2, generator=rng)
        real = teacher.sample(n, rng)
        sigma_real = _sample_sigma(n, config, rng)
        real_t = real + sigma_real[:, None] * torch.randn(n, 2, generator=rng)
        # one pass over [generator x_t; teacher x_t]; only the generator half is a denoising target
        both_x0, both_logits = fake(torch.cat([x_t, real_t]), torch.cat([sigma, sigma_real]))
        fake_x0, (fake_logits, real_logits) = both_x0[:n], both_logits.split(n)
        score_loss = mmfast.fake_score_loss(fake_x0, x, sigma, sigma_data=teacher.sigma_data)
        disc_loss = mmfast.discriminator_loss(real_logits, fake_logits)
        fake_opt.zero_grad(set_to_none=True)
        (score_loss + config.discriminator_weight * disc_loss).backward()
        fake_opt.step()
        losses["fake_score"], losses["discriminator"] = score_loss.item(), disc_loss.item()

    def generator_step() -> None:
        x = gen(torch.randn(n, config.latent_dim, generator=rng))
        sigma = _sample_sigma(n, config, rng)
        x_t = x + sigma[:, None] * torch.randn(n, 2, generator=rng)
        fake.requires_grad_(False)
        try:
            if form == "fdistill":  # DMD form: the score difference is a constant; only x gets a gradient
                with torch.no_grad():
                    teacher_x0 = teacher.denoise(x_t, sigma)
                    fake_x0, logits = fake(x_t, sigma)
            else:  # SiD form: gradients flow through both x0-predictions into x_t
                teacher_x0 = teacher.denoise(x_t, sigma)
                fake_x0, logits = fake(x_t, sigma)
            loss = gen_loss_fn(x, teacher_x0, fake_x0, _density_ratio(logits.detach(), config))
            gen_opt.zero_grad(set_to_none=True)
            loss.backward()
            gen_opt.step()
        finally:
            fake.requires_grad_(True)
        losses["generator"] = loss.item()

    total = config.fake_warmup_steps + config.steps
    bar = _progress(total, f"{FORM_TITLES[form]} {divergence}", progress)
    start = time.perf_counter()
    for _ in range(config.fake_warmup_steps):
        fake_step()
        bar.update(1)
    for step in range(config.steps):
        for _ in range(config.fake_updates_per_step):
            fake_step()
        generator_step()
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix({k: f"{v:.3g}" for k, v in losses.items()}, refresh=False)
    elapsed = time.perf_counter() - start
    bar.close()
    return gen, {"time_s": elapsed, "steps": config.steps, "fake_warmup_steps": config.fake_warmup_steps,
                 "final_losses": dict(losses)}


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------------------------
# the experiment


@dataclasses.dataclass
class RingRun:
    """One run: its configuration, metrics, and ``n_eval`` generator samples (kept for the plots)."""

    form: str
    divergence: str
    metrics: dict
    samples: Tensor

    @property
    def name(self) -> str:
        return f"{self.form}/{self.divergence}"


@dataclasses.dataclass
class RingResults:
    """All runs, the teacher's reference samples and noise floor, the configuration and the machine."""

    runs: list[RingRun]
    teacher: RingTeacher
    teacher_samples: Tensor
    teacher_metrics: dict
    config: RingConfig
    machine: dict
    total_time_s: float
    command: str = ""
    files: list[Path] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "teacher": dataclasses.asdict(self.teacher) | {"sigma_data": self.teacher.sigma_data},
            "teacher_noise_floor": self.teacher_metrics,
            "config": dataclasses.asdict(self.config),
            "machine": self.machine,
            "total_time_s": self.total_time_s,
            "command": self.command,
            "runs": [{"run": r.name, "form": r.form, "divergence": r.divergence} | r.metrics for r in self.runs],
        }


def machine_info() -> dict:
    """CPU model, torch threads, torch and Python versions, and the date (UTC)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "torch_threads": torch.get_num_threads(),
        "mmfast_backend": mmfast.backend_info("cpu")["chosen"],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
    }


def run_one_step_ring(
    out_dir: str | Path | None = None,
    divergences: Sequence[str] = DEFAULT_DIVERGENCES,
    forms: Sequence[str] = DEFAULT_FORMS,
    config: RingConfig | None = None,
    teacher: RingTeacher = RingTeacher(),
    steps: int | None = None,
    quick: bool = False,
    seed: int = 0,
    n_eval: int = 10_000,
    progress: bool = True,
    extra_runs: Sequence[tuple[str, str]] = (),
) -> RingResults:
    """Run the one-step ring distillation for every (form, divergence) pair and measure each generator.

    Args:
        out_dir: when given, receives ``results.md`` (the table), ``metrics.json`` and ``ring_<divergence>.png``
            (teacher vs generator samples, the forms side by side; needs matplotlib).
        divergences: h(r) families to train with (default reverse_kl, kl, js, jeffreys).
        forms: ``fdistill`` (f-distill form) and/or ``uni_instruct`` (Uni-Instruct form with ``config.di``);
            ``uni_instruct_no_di`` is the Uni-Instruct form with the DI term off.
        config: hyperparameters (default :class:`RingConfig()`, or ``QUICK_CONFIG`` with ``quick``).
        teacher: the ring (default 8 modes, radius 2, std 0.1).
        steps: overrides ``config.steps``.
        seed: every run uses the same seed (same initial networks and noise stream).
        n_eval: generator samples per run and teacher samples per reference set for the metrics.
        extra_runs: (form, divergence) pairs run after the divergences x forms grid.

    Returns:
        :class:`RingResults`: per run the metrics (``modes_covered``, ``modes_near_centre``, ``mode_fractions``,
        ``off_mode_fraction``, ``energy_distance``, ``time_s``, ``steps``, ``final_losses``) and the samples.
    """
    for name in divergences:
        if name not in ALL_DIVERGENCES:
            raise ValueError(f"divergences: unknown divergence {name!r}; expected one of {ALL_DIVERGENCES}")
    for name in forms:
        if name not in FORMS:
            raise ValueError(f"forms: unknown form {name!r}; expected one of {FORMS}")
    if not divergences or not forms:
        raise ValueError("divergences and forms must not be empty")
    pairs = [(form, divergence) for divergence in divergences for form in forms]
    for item in extra_runs:
        if len(item) != 2 or item[0] not in FORMS or item[1] not in ALL_DIVERGENCES:
            raise ValueError(f"extra_runs: expected (form, divergence) pairs with a form of {FORMS} and a "
                             f"divergence of {ALL_DIVERGENCES}, got {item!r}")
        pairs.append((item[0], item[1]))
    config = config if config is not None else (QUICK_CONFIG if quick else RingConfig())
    if steps is not None:
        config = dataclasses.replace(config, steps=int(steps))
    eval_rng = torch.Generator().manual_seed(10_000 + seed)
    teacher_samples = teacher.sample(n_eval, eval_rng)
    teacher_metrics = sample_metrics(teacher.sample(n_eval, eval_rng), teacher_samples, teacher)
    start = time.perf_counter()
    runs = []
    for form, divergence in pairs:
        gen, log = train_one_step_generator(teacher, divergence, form, config, seed=seed, progress=progress)
        with torch.no_grad():
            z = torch.randn(n_eval, config.latent_dim, generator=torch.Generator().manual_seed(20_000 + seed))
            samples = gen(z)
        metrics = sample_metrics(samples, teacher_samples, teacher) | log
        runs.append(RingRun(form, divergence, metrics, samples))
    command = (f"python -m mmfast.recipes.one_step_ring --out DIR --divergences {' '.join(divergences)} "
               f"--forms {' '.join(forms)} --steps {config.steps} --seed {seed} --n-eval {n_eval}")
    if extra_runs:
        command += " --extra-runs " + " ".join(f"{f}/{d}" for f, d in extra_runs)
    base = QUICK_CONFIG if quick else RingConfig()
    if dataclasses.replace(config, steps=base.steps) != base or teacher != RingTeacher():
        command = f"run_one_step_ring(...) with a custom RingConfig / RingTeacher (grid as in: {command})"
    elif quick:
        command += " --quick"
    results = RingResults(runs, teacher, teacher_samples, teacher_metrics, config, machine_info(),
                          time.perf_counter() - start, command)
    if out_dir is not None:
        results.files = write_outputs(results, Path(out_dir))
    return results


# ---------------------------------------------------------------------------------------------------------------
# outputs


def results_table(results: RingResults) -> str:
    """Markdown table: run, form, divergence, modes covered, off-mode %, energy distance, time, steps."""
    k = results.teacher.n_modes
    lines = [
        "| run | form | divergence | modes covered | modes within 4 std | off-mode % | energy distance | time (s) "
        "| steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results.runs:
        m = r.metrics
        lines.append(
            f"| {r.name} | {FORM_TITLES[r.form]} | {r.divergence} | {m['modes_covered']}/{k} | "
            f"{m['modes_near_centre']}/{k} | {100 * m['off_mode_fraction']:.1f} | {m['energy_distance']:.4f} | "
            f"{m['time_s']:.1f} | {m['steps']} |"
        )
    t = results.teacher_metrics
    lines.append(
        f"| teacher vs teacher (noise floor) | - | - | {t['modes_covered']}/{k} | {t['modes_near_centre']}/{k} | "
        f"{100 * t['off_mode_fraction']:.1f} | {t['energy_distance']:.4f} | - | - |"
    )
    return "\n".join(lines)


def results_markdown(results: RingResults) -> str:
    """The table with the teacher, the configuration, the metric definitions and the machine."""
    t, c, m = results.teacher, results.config, results.machine
    n_eval = results.teacher_samples.shape[0]
    return "\n".join([
        "# One-step distillation of a 2-D ring (f-distill and Uni-Instruct forms)",
        "",
        f"Teacher: {t.n_modes} Gaussians, radius {t.radius}, std {t.std}, sigma_data {t.sigma_data:.4f}; "
        f"EDM noise log sigma ~ N({c.sigma_log_mean}, {c.sigma_log_std}^2) clipped to [{c.sigma_min}, {c.sigma_max}].",
        f"Training: {c.steps} alternating steps after {c.fake_warmup_steps} fake-score warm-up steps, batch "
        f"{c.batch_size}, MLP width {c.width} x depth {c.depth}, latent dim {c.latent_dim}, Adam lr generator "
        f"{c.generator_lr} / fake score {c.fake_lr}, betas {tuple(c.adam_betas)}; Uni-Instruct alpha {c.alpha}, "
        f"fgm {c.fgm}, di {c.di}; f-distill h normalised by its batch mean: {c.normalize_h}.",
        "Forms: f-distill = `mmfast.nn.FDistillLoss` (h = fdiv_weight(r), batch-normalised; DMD-style, only x gets "
        "a gradient); Uni-Instruct = `mmfast.nn.UniInstructLoss` (coefficients lambda_sim, lambda_fgm, lambda_di "
        "normalised by the batch mean of h; gradients through the teacher's and the fake score's x0-predictions); "
        "'di=False' = the same without the DI term. r = `mmfast.density_ratio` of the discriminator head's logits.",
        f"Metrics on {n_eval} samples: a mode is covered when >= 2% of the samples are nearest to its centre; "
        f"'within 4 std' counts only the samples within 4 std ({4 * t.std:g}) of the centre; off-mode = farther "
        f"than 4 std from every centre; energy distance (V-statistic, Euclidean) to {n_eval} teacher samples, "
        "whose floor is the teacher-vs-teacher row (two independent sample sets). Time = the training loop's wall "
        "time.",
        "",
        results_table(results),
        "",
        f"Machine: {m['cpu']}, {m['torch_threads']} torch threads, torch {m['torch']}, Python {m['python']}, "
        f"mmfast backend {m['mmfast_backend']}, "
        f"{m['date_utc']} UTC. Total time for all runs (training + evaluation): {results.total_time_s:.0f} s.",
        "",
        f"Command: `{results.command}`",
        "",
    ])


def plot_ring_samples(results: RingResults, divergence: str, path: str | Path) -> Path:
    """Scatter of teacher vs generator samples for ``divergence``, one panel per form; saved as a PNG."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install 'mmfast[plot]' (or pip install matplotlib)") from err
    runs = [r for r in results.runs if r.divergence == divergence]
    if not runs:
        raise ValueError(f"divergence: no run with divergence {divergence!r}")
    fig = Figure(figsize=(4.2 * len(runs), 4.4))
    axes = fig.subplots(1, len(runs), squeeze=False)[0]
    limit = 1.6 * results.teacher.radius
    teacher = results.teacher_samples.numpy()
    for ax, run in zip(axes, runs, strict=True):
        samples = run.samples.numpy()
        ax.scatter(teacher[:, 0], teacher[:, 1], s=2, c="0.6", alpha=0.5, linewidths=0, label="teacher")
        ax.scatter(samples[:, 0], samples[:, 1], s=2, c="tab:red", alpha=0.4, linewidths=0, label="generator")
        ax.set_xlim(-limit, limit)
        ax.set_ylim(-limit, limit)
        ax.set_aspect("equal")
        m = run.metrics
        outside = float((run.samples.abs() > limit).any(dim=1).double().mean())
        title = (f"{FORM_TITLES[run.form]}, {divergence}\nmodes {m['modes_covered']}/{results.teacher.n_modes}, "
                 f"ED {m['energy_distance']:.3g}, off {100 * m['off_mode_fraction']:.0f}%")
        if outside > 0:
            title += f", {100 * outside:.1f}% outside the frame"
        ax.set_title(title, fontsize=9)
        ax.legend(loc="upper right", fontsize=7, markerscale=4)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def write_outputs(results: RingResults, out_dir: Path) -> list[Path]:
    """Write ``results.md``, ``metrics.json`` and one ``ring_<divergence>.png`` per divergence into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / "results.md"
    table.write_text(results_markdown(results))
    metrics = out_dir / "metrics.json"
    metrics.write_text(json.dumps(results.to_json(), indent=2) + "\n")
    files = [table, metrics]
    for divergence in dict.fromkeys(r.divergence for r in results.runs):
        files.append(plot_ring_samples(results, divergence, out_dir / f"ring_{divergence}.png"))
    return files


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mmfast.recipes.one_step_ring",
        description="One-step distillation of a 2-D ring of Gaussians with the f-distill and Uni-Instruct losses.",
    )
    parser.add_argument("--out", required=True, help="output folder (results.md, metrics.json, PNGs)")
    parser.add_argument("--quick", action="store_true", help=f"short runs ({QUICK_CONFIG.steps} steps)")
    parser.add_argument("--steps", type=int, default=None, help="generator steps per run")
    parser.add_argument("--divergences", nargs="+", default=list(DEFAULT_DIVERGENCES), choices=ALL_DIVERGENCES)
    parser.add_argument("--forms", nargs="+", default=list(DEFAULT_FORMS), choices=FORMS)
    parser.add_argument("--extra-runs", nargs="+", default=[], metavar="FORM/DIVERGENCE",
                        help="single runs after the grid, e.g. uni_instruct_no_di/js")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-eval", type=int, default=10_000, help="samples per metric set")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    extra_runs = []
    for item in args.extra_runs:
        form, _, divergence = item.partition("/")
        if form not in FORMS or divergence not in ALL_DIVERGENCES:
            parser.error(f"--extra-runs: expected FORM/DIVERGENCE with FORM in {FORMS} and DIVERGENCE in "
                         f"{ALL_DIVERGENCES}, got {item!r}")
        extra_runs.append((form, divergence))
    results = run_one_step_ring(args.out, args.divergences, args.forms, steps=args.steps, quick=args.quick,
                                seed=args.seed, n_eval=args.n_eval, progress=not args.no_progress,
                                extra_runs=extra_runs)
    print(results_table(results))
    print(f"wrote {', '.join(str(p) for p in results.files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
