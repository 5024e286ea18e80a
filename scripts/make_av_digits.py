"""Generate AV-Digits, mmfast's offline two-modality (image + audio) digit dataset, as one ``.npz`` file.

Image modality: scikit-learn's bundled handwritten digits (``sklearn.datasets.load_digits``: 1,797 real 8x8 scans,
pixel values 0..16; no download). Audio modality: the words "zero".."nine" spoken by Debian's ``espeak-ng``
(several voices, speeds and pitches), with additive white or pink Gaussian noise at a few signal-to-noise ratios,
turned into log-mel spectrograms with numpy only (own STFT with a periodic Hann window and a triangular mel
filterbank). Each image gets one audio clip of its own class; the pairing, the noise, the clip placement and the
stratified ~75/25 train/test split all come from one seeded ``numpy.random.Generator``, and espeak-ng's output is
deterministic, so a fixed ``--seed`` gives a byte-identical dataset.

Requirements (generation only; loading the file needs numpy and torch only): ``scikit-learn`` and the
``espeak-ng`` program (Debian/Ubuntu: ``apt-get install espeak-ng``; pip: ``pip install scikit-learn``).

Usage::

    python scripts/make_av_digits.py                      # writes mmfast/data/av_digits.npz, seed 0
    python scripts/make_av_digits.py --out /tmp/x.npz --seed 1

The data card is ``mmfast/data/AV_DIGITS.md``; the loader is :func:`mmfast.load_av_digits`.
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import time
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# espeak-ng voices: language voices and "+variant" voices (``espeak-ng --voices=en``, ``--voices=variant``)
VOICES = (
    "en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-x-gbcwmd", "en+m3",
    "en+f2", "en+f4", "en-us+f3", "en+klatt", "en+croak", "en-us+Andy", "en+Alicia", "en+whisperf",
)
SPEEDS = (120, 150, 180, 210)  # words per minute (espeak-ng -s)
PITCHES = (25, 50, 75)  # espeak-ng -p, 0..99
SNRS_DB = (20.0, 10.0, 5.0, 0.0)  # speech power / noise power over the speech segment
NOISE_KINDS = ("white", "pink")

SAMPLE_RATE = 22050  # espeak-ng's native rate
N_FFT = 1024
HOP = 672
N_MELS = 32
N_FRAMES = 32
F_MIN = 50.0
F_MAX = 8000.0
DB_RANGE = (-30.0, 40.0)  # log-mel dB (unit-RMS speech) clipped to this range and quantised to uint8 0..255
TEST_FRACTION = 0.25
CLIP_SAMPLES = (N_FRAMES - 1) * HOP + N_FFT  # 21,856 samples = 0.991 s
TRIM_DB = -40.0  # leading/trailing samples below this level (relative to the peak) are cut


def _die(msg: str) -> None:
    print(f"make_av_digits: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def synthesise(word: str, voice: str, speed: int, pitch: int, espeak: str) -> np.ndarray:
    """Speak ``word`` with espeak-ng and return the float64 waveform in [-1, 1] at ``SAMPLE_RATE``."""
    cmd = [espeak, "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", word]
    proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0 or not proc.stdout:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}")
    with wave.open(io.BytesIO(proc.stdout)) as w:
        if w.getframerate() != SAMPLE_RATE or w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise RuntimeError(f"unexpected espeak-ng output format for {cmd}")
        raw = w.readframes(w.getnframes())  # the streamed header's length is a placeholder: reads what is there
    return np.frombuffer(raw, dtype="<i2").astype(np.float64) / 32768.0


def trim(x: np.ndarray) -> np.ndarray:
    """Cut the leading and trailing parts whose 10 ms frame RMS is below ``TRIM_DB`` of the loudest frame."""
    frame = SAMPLE_RATE // 100
    n = len(x) // frame
    rms = np.sqrt(np.mean(x[: n * frame].reshape(n, frame) ** 2, axis=1) + 1e-20)
    loud = np.flatnonzero(20 * np.log10(rms / rms.max()) > TRIM_DB)
    return x[loud[0] * frame : (loud[-1] + 1) * frame]


def hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    """HTK mel scale: m = 2595 log10(1 + f / 700)."""
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz(m: np.ndarray | float) -> np.ndarray:
    """Inverse of :func:`hz_to_mel`: f = 700 (10^(m / 2595) - 1)."""
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank() -> np.ndarray:
    """(N_MELS, N_FFT // 2 + 1) triangular filters, centres evenly spaced in mel between F_MIN and F_MAX, unit area
    in Hz (Slaney normalisation: 2 / (f_right - f_left))."""
    freqs = np.arange(N_FFT // 2 + 1) * SAMPLE_RATE / N_FFT
    edges = mel_to_hz(np.linspace(hz_to_mel(F_MIN), hz_to_mel(F_MAX), N_MELS + 2))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    tri = np.maximum(0.0, np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)))
    return tri * (2.0 / (hi - lo))


def log_mel(x: np.ndarray, fb: np.ndarray) -> np.ndarray:
    """(N_MELS, N_FRAMES) log-mel power in dB of a ``CLIP_SAMPLES``-long signal: frames t = x[t*HOP : t*HOP+N_FFT]
    times a periodic Hann window, |rfft|^2, mel filterbank, 10 log10(max(., 1e-12))."""
    idx = np.arange(N_FRAMES)[:, None] * HOP + np.arange(N_FFT)[None, :]
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(N_FFT) / N_FFT)
    power = np.abs(np.fft.rfft(x[idx] * window, axis=1)) ** 2
    return 10.0 * np.log10(np.maximum(power @ fb.T, 1e-12)).T


def make_noise(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-power Gaussian noise: white, or pink (power spectrum ~ 1/f, shaped in the frequency domain)."""
    w = rng.standard_normal(n)
    if kind == "pink":
        spec = np.fft.rfft(w)
        f = np.arange(len(spec), dtype=np.float64)
        f[0] = 1.0
        w = np.fft.irfft(spec / np.sqrt(f), n)
    return w / np.sqrt(np.mean(w**2))


def stratified_split(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """0 (train) / 1 (test) per sample: round(TEST_FRACTION * n_c) random samples of each class go to test."""
    split = np.zeros(len(labels), dtype=np.uint8)
    for c in range(len(WORDS)):
        idx = rng.permutation(np.flatnonzero(labels == c))
        split[idx[: int(round(TEST_FRACTION * len(idx)))]] = 1
    return split


def generate(seed: int, workers: int = 2, progress: bool = True) -> dict[str, np.ndarray]:
    """Build every array of the dataset file (see the data card for their meaning)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        _die("scikit-learn is required to generate AV-Digits (pip install scikit-learn)")
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        _die("the espeak-ng program is required to generate AV-Digits (apt-get install espeak-ng)")
    import sklearn
    from tqdm import tqdm

    version = subprocess.run([espeak, "--version"], capture_output=True, text=True, check=False).stdout
    version = version.split("Data at")[0].strip()  # e.g. "eSpeak NG text-to-speech: 1.51"

    digits = load_digits()
    images = np.asarray(digits.images)
    if images.shape != (1797, 8, 8) or images.min() < 0 or images.max() > 16:
        _die(f"unexpected sklearn digits: shape {images.shape}, range {images.min()}..{images.max()}")
    image = images.astype(np.uint8)
    label = np.asarray(digits.target).astype(np.uint8)
    n = len(label)

    rng = np.random.default_rng(seed)
    split = stratified_split(label, rng)
    voice = rng.integers(0, len(VOICES), n).astype(np.uint8)
    speed = rng.integers(0, len(SPEEDS), n).astype(np.uint8)
    pitch = rng.integers(0, len(PITCHES), n).astype(np.uint8)
    snr = rng.integers(0, len(SNRS_DB), n).astype(np.uint8)
    noise_kind = rng.integers(0, len(NOISE_KINDS), n).astype(np.uint8)
    word = label.copy()  # the pairing: each image's audio clip speaks the image's class

    keys = sorted({(int(w), int(v), int(s), int(p)) for w, v, s, p in zip(word, voice, speed, pitch, strict=True)})
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        jobs = pool.map(lambda k: trim(synthesise(WORDS[k[0]], VOICES[k[1]], SPEEDS[k[2]], PITCHES[k[3]], espeak)),
                        keys)
        waves = dict(zip(keys, tqdm(jobs, total=len(keys), desc="espeak-ng", disable=not progress), strict=True))

    fb = mel_filterbank()
    lo, hi = DB_RANGE
    audio = np.empty((n, N_MELS, N_FRAMES), dtype=np.uint8)
    offset = np.empty(n, dtype=np.int32)
    for i in tqdm(range(n), desc="log-mel", disable=not progress):
        speech = waves[(int(word[i]), int(voice[i]), int(speed[i]), int(pitch[i]))]
        speech = speech / np.sqrt(np.mean(speech**2))  # unit RMS over the speech segment
        if len(speech) > CLIP_SAMPLES:  # cannot happen with the settings above; keep the middle if it does
            start = (len(speech) - CLIP_SAMPLES) // 2
            speech = speech[start : start + CLIP_SAMPLES]
        offset[i] = rng.integers(0, CLIP_SAMPLES - len(speech) + 1)
        x = np.zeros(CLIP_SAMPLES)
        x[offset[i] : offset[i] + len(speech)] = speech
        x += make_noise(NOISE_KINDS[noise_kind[i]], CLIP_SAMPLES, rng) * 10.0 ** (-SNRS_DB[snr[i]] / 20.0)
        db = log_mel(x, fb)
        audio[i] = np.round((np.clip(db, lo, hi) - lo) / (hi - lo) * 255.0).astype(np.uint8)

    return {
        "version": np.array(FORMAT_VERSION, dtype=np.int64),
        "seed": np.array(seed, dtype=np.int64),
        "espeak_version": np.array(version),
        "sklearn_version": np.array(sklearn.__version__),
        "image": image,
        "audio": audio,
        "label": label,
        "split": split,
        "word": word,
        "voice": voice,
        "speed": speed,
        "pitch": pitch,
        "snr": snr,
        "noise": noise_kind,
        "offset": offset,
        "classes": np.array(WORDS),
        "voices": np.array(VOICES),
        "speeds_wpm": np.array(SPEEDS, dtype=np.int64),
        "pitches": np.array(PITCHES, dtype=np.int64),
        "snrs_db": np.array(SNRS_DB, dtype=np.float64),
        "noise_kinds": np.array(NOISE_KINDS),
        "db_range": np.array(DB_RANGE, dtype=np.float64),
        "audio_params": np.array([SAMPLE_RATE, N_FFT, HOP, N_MELS, N_FRAMES, F_MIN, F_MAX], dtype=np.float64),
    }


def main(argv: list[str] | None = None) -> int:
    default_out = Path(__file__).resolve().parent.parent / "mmfast" / "data" / "av_digits.npz"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=default_out, help=f"output .npz (default: {default_out})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pairing, split and noise (default: 0)")
    parser.add_argument("--workers", type=int, default=2, help="espeak-ng processes run at once (default: 2)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error("--seed must be >= 0")
    t0 = time.perf_counter()
    arrays = generate(args.seed, workers=args.workers, progress=not args.quiet)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "wb") as f:  # a file object: np.savez_compressed would append ".npz" to a bare name
        np.savez_compressed(f, **arrays)
    n_test = int(arrays["split"].sum())
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB; {len(arrays['label'])} pairs, "
          f"{len(arrays['label']) - n_test} train / {n_test} test) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
