"""Write the speech-like data of recipes/speech_digits.yaml: synthesised spoken digit strings as
log-mel feature frames, one .npy per utterance, listed in TSVs with their transcripts.

    python recipes/make_digits_speech.py [OUT_DIR] [N_TRAIN]     (default runs/digits_speech, 3000)

Each utterance is 1-4 digit words ("three one four"). A word is a sequence of phone-like
segments from a small source-filter synthesiser (8 kHz): vowels and voiced consonants a pulse
train at the speaker's pitch through two formant resonators, fricatives and bursts band-passed
noise. Every utterance draws a speaker (pitch 90-230 Hz, vocal-tract scale 0.88-1.15 on the
formants), its own segment durations, pauses and background noise. Frames: 25 ms windows every
10 ms, 40 log-mel energies (scipy's STFT; the mel filter bank is written here, librosa not being a
dependency). No download; the same seed gives the same files.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

RATE = 8000
N_MELS = 40

# (kind, F1 Hz, F2 Hz): "v" voiced with formants, "n" nasal (weak, low), "f" fricative noise band,
# "z" voiced fricative, "b" burst; two pairs of formants: a glide from the first to the second
VOWELS = {"iy": (270, 2290), "ih": (390, 1990), "eh": (530, 1840), "ah": (520, 1190), "aa": (730, 1090),
          "ao": (570, 840), "uw": (300, 870), "ow": (450, 1000), "r": (310, 1060), "w": (300, 610), "n": (250, 1700)}
NOISE = {"s": (3000, 3950), "f": (1500, 3900), "th": (2200, 3950), "z": (2800, 3950), "v": (1200, 3000),
         "t": (2000, 3950), "k": (1200, 2600)}
WORDS = {
    "zero": ["z", "ih", "r", "ow"], "one": ["w", "ah", "n"], "two": ["t", "uw"], "three": ["th", "r", "iy"],
    "four": ["f", "ao", "r"], "five": ["f", "aa>iy", "v"], "six": ["s", "ih", "k", "s"],
    "seven": ["s", "eh", "v", "ah", "n"], "eight": ["eh>iy", "t"], "nine": ["n", "aa>iy", "n"],
}
VOICED_NOISE = {"z", "v"}
BURSTS = {"t", "k"}


def resonator(x: np.ndarray, f: np.ndarray, bw: float) -> np.ndarray:
    """x through a two-pole resonator whose centre follows f (per sample)."""
    r = np.exp(-np.pi * bw / RATE)
    y = np.zeros_like(x)
    y1 = y2 = 0.0
    a1 = 2 * r * np.cos(2 * np.pi * f / RATE)
    g = 1 - r
    for i in range(len(x)):
        y0 = g * x[i] + a1[i] * y1 - r * r * y2
        y[i], y2, y1 = y0, y1, y0
    return y


def segment(phone: str, speaker: dict, rng: np.random.Generator) -> np.ndarray:
    from scipy.signal import butter, lfilter

    if phone in NOISE:
        dur = rng.uniform(0.02, 0.04) if phone in BURSTS else rng.uniform(0.06, 0.11)
        n = int(dur * RATE)
        lo, hi = NOISE[phone]
        b, a = butter(2, [lo / (RATE / 2), hi / (RATE / 2)], btype="band")
        out = lfilter(b, a, rng.standard_normal(n)) * (0.5 if phone in BURSTS else 0.25)
        if phone in VOICED_NOISE:
            out = out * 0.6 + 0.4 * voiced(VOWELS["uw"], VOWELS["uw"], n, speaker, rng) * 0.5
        return out
    first, _, second = phone.partition(">")
    n = int(rng.uniform(0.05, 0.09) * RATE) if first in ("r", "w", "n") else int(rng.uniform(0.09, 0.17) * RATE)
    out = voiced(VOWELS[first], VOWELS[second or first], n, speaker, rng)
    return out * (0.4 if first == "n" else 1.0)


def voiced(start, end, n: int, speaker: dict, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(n) / RATE
    f0 = speaker["f0"] * (1 + 0.05 * np.sin(2 * np.pi * rng.uniform(1, 3) * t))
    phase = np.cumsum(f0 / RATE)
    pulses = (np.diff(np.floor(phase), prepend=0) > 0).astype(np.float64)
    k = np.linspace(0, 1, n)
    f1 = speaker["scale"] * (start[0] + (end[0] - start[0]) * k)
    f2 = speaker["scale"] * (start[1] + (end[1] - start[1]) * k)
    y = resonator(pulses, f1, 90) + 0.6 * resonator(pulses, f2, 130)
    return y / (np.abs(y).max() + 1e-9) * np.hanning(n) ** 0.3


def utterance(words: list[str], rng: np.random.Generator) -> np.ndarray:
    speaker = {"f0": rng.uniform(90, 230), "scale": rng.uniform(0.88, 1.15)}
    parts = [np.zeros(int(rng.uniform(0.05, 0.15) * RATE))]
    for w in words:
        parts += [segment(p, speaker, rng) for p in WORDS[w]]
        parts.append(np.zeros(int(rng.uniform(0.03, 0.12) * RATE)))
    x = np.concatenate(parts)
    return x + rng.uniform(0.003, 0.02) * rng.standard_normal(len(x))


def mel_filters(n_fft: int) -> np.ndarray:
    """(N_MELS, n_fft // 2 + 1) triangular filters evenly spaced on the mel scale (HTK formula)."""
    mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    hz = lambda m: 700 * (10 ** (m / 2595) - 1)  # noqa: E731
    edges = hz(np.linspace(mel(0), mel(RATE / 2), N_MELS + 2))
    freqs = np.linspace(0, RATE / 2, n_fft // 2 + 1)
    fb = np.zeros((N_MELS, len(freqs)))
    for i in range(N_MELS):
        lo, mid, hi = edges[i: i + 3]
        fb[i] = np.clip(np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)), 0, None)
    return fb


def log_mel(x: np.ndarray) -> np.ndarray:
    """(frames, N_MELS) float32: 25 ms windows every 10 ms."""
    from scipy.signal import stft

    _, _, z = stft(x, fs=RATE, nperseg=200, noverlap=120, nfft=256, boundary=None, padded=False)
    power = np.abs(z) ** 2                                        # (freqs, frames)
    return np.log(mel_filters(256) @ power + 1e-6).T.astype(np.float32)


def main(out: str = "runs/digits_speech", n_train: str | int = 3000) -> Path:
    folder = Path(out)
    (folder / "frames").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1234)
    names = list(WORDS)
    sizes = {"train": int(n_train), "dev": 200, "test": 300}
    for split, n in sizes.items():
        lines = []
        for i in range(n):
            words = [names[j] for j in rng.integers(0, 10, rng.integers(1, 5))]
            name = f"frames/{split}-{i:05d}.npy"
            np.save(folder / name, log_mel(utterance(words, rng)), allow_pickle=False)
            lines.append(f"{name}\t{' '.join(words)}\n")
        (folder / f"{split}.tsv").write_text("".join(lines), encoding="utf-8")
        print(f"{folder / split}.tsv: {n} utterances")
    return folder


if __name__ == "__main__":
    main(*sys.argv[1:])
