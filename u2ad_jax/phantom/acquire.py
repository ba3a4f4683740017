"""Scanner profiles and acquisition effects of the synthetic cohort (the domain shift).

Order of the simulated acquisition, per slice (all applied to the lesion-bearing object, so
lesions and normal tissue share every effect):
1. phase-encode ghosts of the pulsating CSF (and, rarely, of the whole image) added to the
   object, as they arise in k-space;
2. k-space truncation: only a central fraction of k-space is acquired (phase encode along AP,
   readout along SI) and zero-filled, with a mild apodisation -> Gibbs ringing at sharp edges
   (the classic truncation lines inside the cord next to CSF);
3. smooth multiplicative coil sensitivity: posterior surface coil fall-off, slow SI and
   lateral variation;
4. a mild intensity non-linearity (clinical only);
5. Rician noise: magnitude of the complex signal plus white Gaussian noise in both channels.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.fft


@dataclasses.dataclass(frozen=True)
class Profile:
  """Ranges (lo, hi) drawn uniformly per subject, and fixed settings of one scanner profile."""
  name: str
  tr: tuple[float, float]
  te: tuple[float, float]
  fat_t2: tuple[float, float]  # apparent T2 of fat (ms): long in 2D TSE, short in 3D VFA
  fat_pd: tuple[float, float]
  marrow_fat: tuple[float, float]  # fat fraction of vertebral marrow (older patients: fattier)
  muscle_fat: tuple[float, float]  # fatty infiltration of muscle
  pixel_mm: tuple[float, float]  # in-plane pixel
  fov_si: tuple[float, float]
  fov_ap: tuple[float, float]
  thickness: tuple[float, float]  # slice thickness (mm)
  gap: float  # slice gap as a fraction of the thickness
  num_slices: int
  sub_slices: int  # thin sub-slices averaged per slice (through-plane partial volume)
  kspace_pe: tuple[float, float]  # acquired fraction of k-space along AP (phase encode)
  kspace_ro: tuple[float, float]  # along SI (readout)
  apodization: tuple[float, float]  # Tukey taper fraction of the acquired k-space edge
  snr: tuple[float, float]  # CSF signal at the cord / noise sigma
  gamma: tuple[float, float]  # intensity non-linearity exponent (1 = linear)
  bias_strength: tuple[float, float]
  bias_length: tuple[float, float]  # coil fall-off length (mm)
  ghost_probability: float
  csf_patchiness: tuple[float, float]  # depth of patchy pulsatile-flow signal loss in the CSF
  lesion_fraction: float  # default fraction of lesion subjects in a cohort
  healthy: bool  # healthy volunteers: mild degeneration, no cord compression


PROFILES: dict[str, Profile] = {
    # Healthy public data (Spine-Generic-like 3D T2): ~0.8 mm, high SNR, dark fat.
    "public": Profile(
        name="public", tr=(3500.0, 4500.0), te=(130.0, 150.0), fat_t2=(62.0, 78.0), fat_pd=(0.9, 1.0),
        marrow_fat=(0.15, 0.3), muscle_fat=(0.02, 0.05), pixel_mm=(0.78, 0.84),
        fov_si=(250.0, 264.0), fov_ap=(250.0, 264.0), thickness=(0.8, 0.9), gap=0.0, num_slices=15,
        sub_slices=1, kspace_pe=(0.82, 0.92), kspace_ro=(0.9, 1.0), apodization=(0.15, 0.3),
        snr=(40.0, 60.0), gamma=(1.0, 1.0), bias_strength=(0.25, 0.4), bias_length=(90.0, 140.0),
        ghost_probability=0.15, csf_patchiness=(0.15, 0.4), lesion_fraction=0.0, healthy=True),
    # Clinical 2D TSE: thick slices, lower SNR, bright fat, other TR/TE and field of view.
    "clinical": Profile(
        name="clinical", tr=(3000.0, 4500.0), te=(95.0, 115.0), fat_t2=(200.0, 260.0), fat_pd=(1.35, 1.5),
        marrow_fat=(0.1, 0.2), muscle_fat=(0.08, 0.15), pixel_mm=(0.62, 0.8),
        fov_si=(220.0, 250.0), fov_ap=(220.0, 240.0), thickness=(3.0, 4.0), gap=0.1, num_slices=9,
        sub_slices=3, kspace_pe=(0.5, 0.8), kspace_ro=(0.8, 0.95), apodization=(0.0, 0.1),
        snr=(16.0, 24.0), gamma=(0.85, 0.95), bias_strength=(0.45, 0.65), bias_length=(60.0, 100.0),
        ghost_probability=0.3, csf_patchiness=(0.5, 0.9), lesion_fraction=0.5, healthy=False),
}


def draw(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
  lo, hi = bounds
  return float(lo) if hi == lo else float(rng.uniform(lo, hi))


def kspace_window(shape: tuple[int, int], pe_fraction: float, ro_fraction: float,
                  taper: float) -> np.ndarray:
  """Window on the `rfft2` grid of an `[H, W]` image: 1 inside the acquired centre of k-space
  (|k_row| <= ro_fraction * Nyquist, |k_col| <= pe_fraction * Nyquist), 0 outside, with a Tukey
  taper over the outer `taper` fraction of the acquired band. Returns float32 `[H, W // 2 + 1]`.
  """
  def axis(freqs: np.ndarray, fraction: float) -> np.ndarray:
    r = np.abs(freqs) / 0.5 / max(fraction, 1e-6)  # 1 at the acquired edge
    w = np.ones_like(r)
    if taper > 0:
      start = 1.0 - taper
      inner = (r > start) & (r <= 1.0)
      w[inner] = 0.5 * (1.0 + np.cos(np.pi * (r[inner] - start) / taper))
    w[r > 1.0] = 0.0
    return w

  rows = axis(np.fft.fftfreq(shape[0]), ro_fraction)
  cols = axis(np.fft.rfftfreq(shape[1]), pe_fraction)
  return (rows[:, None] * cols[None, :]).astype(np.float32)


def truncate(image: np.ndarray, window: np.ndarray) -> np.ndarray:
  """Keeps only the acquired part of k-space (zero-filled reconstruction) -> Gibbs ringing."""
  spectrum = scipy.fft.rfft2(image.astype(np.float32), workers=1)
  spectrum *= window
  return scipy.fft.irfft2(spectrum, s=image.shape, workers=1).astype(np.float32)


def coil_sensitivity(s: np.ndarray, t: np.ndarray, skin_post: np.ndarray, z: np.ndarray,
                     strength: float, length: float, si_coeffs: np.ndarray,
                     reference_depth: float) -> np.ndarray:
  """Smooth multiplicative bias `[H, W]`: posterior surface coil fall-off with depth below the
  posterior skin (normalised to 1 at the cord's depth), times a slow SI polynomial."""
  depth = np.maximum(skin_post - t, 0.0)
  fall = (1.0 - strength) + strength * np.exp(-depth / length)
  ref = (1.0 - strength) + strength * np.exp(-reference_depth / length)
  q = (z - z.mean()) / max(float(z.max() - z.min()), 1.0) * 2.0
  si = 1.0 + si_coeffs[0] * q + si_coeffs[1] * (q * q - 1.0 / 3.0)
  return (fall / ref * si[:, None]).astype(np.float32)


def csf_ghosts(csf: np.ndarray, rng_params: tuple[float, int, int]) -> np.ndarray:
  """Pulsation ghosts: copies of the CSF signal displaced along the phase-encode axis (AP)."""
  amplitude, shift, copies = rng_params
  ghost = np.zeros_like(csf)
  for k in range(1, copies + 1):
    a = amplitude / k
    ghost += a * (np.roll(csf, k * shift, axis=1) + np.roll(csf, -k * shift, axis=1))
  return ghost


def nonlinearity(x: np.ndarray, gamma: float, reference: float) -> np.ndarray:
  """Sign-preserving power law around `reference` (the scanner's display mapping)."""
  if gamma == 1.0:
    return x
  return (np.sign(x) * reference * np.abs(x / reference) ** gamma).astype(np.float32)


def rician(clean: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
  """|clean + sigma (n_re + i n_im)|, the magnitude of a noisy complex signal."""
  re = clean + sigma * rng.standard_normal(clean.shape, dtype=np.float32)
  im = sigma * rng.standard_normal(clean.shape, dtype=np.float32)
  return np.sqrt(re * re + im * im).astype(np.float32)
