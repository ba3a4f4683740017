"""Random anatomy of one synthetic cervical spine: geometry only, no intensities.

Coordinates (mm) follow the cord. `s` is the arc length along the cord centreline, 0 at the
tip of the dens, growing inferiorly; `t` is the signed distance from the centreline in the
sagittal plane, growing posteriorly; `u` is the lateral position (x, right positive). Every
structure is described by profiles sampled on a fixed `s` grid (`S_GRID`), which the renderer
gathers per pixel. The centreline itself lives in the image frame (rows superior -> inferior,
columns anterior -> posterior, both in mm from the field-of-view corner) as the polynomial
`y = centreline(z)`.

Sizes follow adult cervical anatomy: vertebral bodies about 15 mm AP x 13-15 mm
high (C2 taller, with the dens), discs 5-6 mm, canal 14-17 mm AP, cord 7-8 mm AP and 10-13 mm
wide (thicker over C4-C6). Degenerated levels lose disc height, desiccate and bulge; stenotic
levels compress the cord to 35-80 % of its normal AP diameter.

The module is somewhat over 400 lines because `sample_anatomy` is one draw: it consumes the
subject's random generator in a fixed order (that order is what makes a seed reproduce a
subject), so it is kept whole rather than spread over modules.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from u2ad_jax import labels

# Bodies drawn (C2 ... T2) and the discs below each of the first seven (C2-3 ... T1-T2).
BODY_NAMES = labels.VERTEBRA_NAMES + ("T2",)
DISC_NAMES = labels.SEGMENT_NAMES + ("T1-T2",)
NUM_BODIES = len(BODY_NAMES)
NUM_DISCS = len(DISC_NAMES)

# The s grid every profile is sampled on (mm). It covers any pixel of a <= 300 mm field of view.
S_MIN, S_MAX, S_STEP = -200.0, 360.0, 0.2
S_GRID = np.arange(S_MIN, S_MAX + 0.5 * S_STEP, S_STEP)

# How often each scored segment hosts degenerative cord compression and therefore lesions:
# most often C5-6, then C4-5, C6-7, C3-4; C2-3 and C7-T1 are rare.
LEVEL_WEIGHTS = np.array([0.03, 0.12, 0.27, 0.38, 0.17, 0.03])

# Mean heights (mm, before the subject scale) of the bodies C2 (with the dens) ... T2, and
# their AP depths. C2's depth is that of its body; the dens is narrower (DENS_DEPTH).
BODY_HEIGHT = np.array([36.0, 13.8, 13.6, 13.6, 14.0, 14.8, 16.2, 17.6])
BODY_DEPTH = np.array([15.5, 15.5, 15.8, 16.2, 16.8, 16.8, 18.0, 19.5])
BODY_HALF_WIDTH = np.array([9.5, 8.5, 8.7, 9.0, 9.5, 10.5, 12.0, 12.5])
DENS_LENGTH, DENS_DEPTH = 14.0, 10.0
DISC_HEIGHT = np.array([5.0, 5.6, 5.8, 6.0, 5.8, 5.0, 4.6])
# Spinous process lengths from the spinolaminar line (C1 posterior tubercle first, then C2 ...).
SPINOUS_LENGTH = np.array([9.0, 28.0, 17.0, 18.0, 20.0, 26.0, 34.0, 36.0, 36.0])


@dataclasses.dataclass
class Lesion:
  """One intramedullary T2 hyperintensity, in cord-normalised coordinates.

  The lesion is the set d < 1 of
    d^2 = ((s' - s_center) / half_length)^2 + ((xi' - xi_center) / h_xi)^2 + ((u - u_center) / half_width)^2
  where xi = (t - cord centre) / cord half-AP, h_xi = min(ap_mm / 2 / cord half-AP, 0.6) (so the
  lesion never exceeds 60 % of the local cord AP) and (s', xi') are smoothly warped (s, xi).
  """
  grade: int
  level: str
  s_center: float
  half_length: float
  ap_mm: float
  half_width: float
  xi_center: float
  u_center: float
  warp: np.ndarray  # [6]: s-warp amplitude, frequency, phase; xi-warp amplitude, frequency, phase.
  target_ratio: float
  pencil: bool


@dataclasses.dataclass
class Anatomy:
  """Geometry of one subject.

  Attributes:
    scale: subject scale (0.9 .. 1.1).
    curvature: 'lordotic', 'straight' or 'kyphotic'.
    centreline: polynomial coefficients (lowest order first) of the cord centre column y(z), mm.
    s_of_dens: the image row z (mm) at which the centreline reaches the dens tip (s = 0).
    body_top, body_bottom: `[8]` s of the upper / lower endplate of C2 ... T2.
    disc_degeneration: `[7]` 0 (healthy) .. 1 (fully desiccated) per disc.
    compression: segment name -> cord compression ratio (compressed AP / normal AP) at the
      stenotic levels.
    s_foramen_magnum: s of the foramen magnum (cord label starts here).
    profiles: name -> `[len(S_GRID)]` float32 profile along s (see `_profiles`).
    lesions: the lesions (empty for a healthy subject).
    osteophytic: `[7]` bool, levels whose indentation is bony (label 7) rather than disc (5).
    soft_protrusion: `[7]` bool, protrusions of hydrated (T2-bright) nucleus.
    modic: `[7]` bool, fatty endplate marrow next to the disc.
    flow_voids: list of (s, side, radius_s, radius_t, depth) CSF flow-void blobs; side +1 puts the
      blob in the CSF in front of the cord, -1 behind it.
    lamina_center, lamina_half_height: `[9]` s centre / half height of the laminae of C1 ... T2.
    spinous_length: `[9]` spinous process lengths (mm) from the spinolaminar line.
    spinous_slope: how much the spinous processes descend per mm of posterior extent.
    c1_anterior: (s, t, radius_s, radius_t) of the anterior arch of the atlas.
    misc: scalar parameters (epidural widths, skin / fat thickness, occiput thickness; the
      generator adds the CSF flow patchiness and the grey-matter contrast).
  """
  scale: float
  curvature: str
  centreline: np.ndarray
  s_of_dens: float
  body_top: np.ndarray
  body_bottom: np.ndarray
  disc_degeneration: np.ndarray
  compression: dict[str, float]
  s_foramen_magnum: float
  profiles: dict[str, np.ndarray]
  lesions: list[Lesion]
  osteophytic: np.ndarray
  soft_protrusion: np.ndarray
  modic: np.ndarray
  flow_voids: list[tuple[float, float, float, float, float]]
  lamina_center: np.ndarray
  lamina_half_height: np.ndarray
  spinous_length: np.ndarray
  spinous_slope: float
  c1_anterior: tuple[float, float, float, float]
  misc: dict[str, float]

  def disc_center(self, k: int) -> float:
    return 0.5 * (self.body_bottom[k] + self.body_top[k + 1])

  def body_center(self, k: int) -> float:
    return 0.5 * (self.body_top[k] + self.body_bottom[k])


def plateau(s: np.ndarray, center: float, flat: float, tail: float) -> np.ndarray:
  """1 within `flat` of `center`, raised-cosine fall-off to 0 over `tail` mm on both sides."""
  d = np.maximum(np.abs(s - center) - flat, 0.0) / max(tail, 1e-6)
  return np.where(d < 1.0, 0.5 * (1.0 + np.cos(np.pi * np.minimum(d, 1.0))), 0.0)


def soft_max(a: np.ndarray, b: np.ndarray, softness: float = 0.6) -> np.ndarray:
  return 0.5 * (a + b + np.sqrt((a - b) ** 2 + softness ** 2))


def soft_min(a: np.ndarray, b: np.ndarray, softness: float = 0.6) -> np.ndarray:
  return 0.5 * (a + b - np.sqrt((a - b) ** 2 + softness ** 2))


def softplus(x: np.ndarray, width: float) -> np.ndarray:
  return width * np.logaddexp(0.0, x / width)


def _piecewise_by_body(s: np.ndarray, centers: np.ndarray, values: np.ndarray) -> np.ndarray:
  """Per-body values linearly interpolated between body centres (constant beyond the ends)."""
  return np.interp(s, centers, values)


def sample_anatomy(rng: np.random.Generator, *, fov_si: float, fov_ap: float, lesion: bool,
                   healthy_profile: bool, grade: int | None = None,
                   slice_positions: np.ndarray | None = None) -> Anatomy:
  """Draws one subject's geometry.

  Args:
    rng: the subject's generator (consumed in a fixed order, so a seed fixes the subject).
    fov_si, fov_ap: field of view (mm) the spine must be placed in.
    lesion: whether the subject gets lesions (they sit at compressed levels).
    healthy_profile: a healthy volunteer (public profile): mild degeneration, no compression.
    grade: force the lesions' grade (1 or 2); None draws it.
    slice_positions: `[X]` lateral slice centres (mm); lesions are centred laterally near the
      slice closest to the cord midline so that every lesion shows on at least one slice.

  Returns:
    The Anatomy.
  """
  k = float(rng.uniform(0.9, 1.1))
  s = S_GRID

  # ---- vertebral column along s (dens tip at s = 0).
  heights = BODY_HEIGHT * k * rng.uniform(0.95, 1.05, NUM_BODIES)
  depths = BODY_DEPTH * k * rng.uniform(0.94, 1.06, NUM_BODIES)
  half_widths = BODY_HALF_WIDTH * k * rng.uniform(0.93, 1.07, NUM_BODIES)
  if healthy_profile:
    degeneration = np.clip(rng.beta(1.2, 5.0, NUM_DISCS), 0.0, 1.0)
  else:
    # DCM patients are older: most discs are partly desiccated, the lower cervical ones most.
    degeneration = np.clip(rng.beta(2.5, 1.6, NUM_DISCS) + np.array([-.2, -.05, 0, .05, .05, -.1, -.2]), 0, 1)
  disc_h = DISC_HEIGHT * k * rng.uniform(0.92, 1.08, NUM_DISCS) * (1.0 - 0.45 * degeneration)
  disc_h = np.maximum(disc_h, 2.4)  # keeps neighbouring bodies apart in the label map
  top = np.zeros(NUM_BODIES)
  bottom = np.zeros(NUM_BODIES)
  cursor = 0.0
  for b in range(NUM_BODIES):
    top[b] = cursor
    bottom[b] = cursor + heights[b]
    cursor = bottom[b] + (disc_h[b] if b < NUM_DISCS else 0.0)
  body_centers = 0.5 * (top + bottom)
  disc_centers = 0.5 * (bottom[:-1] + top[1:])

  # ---- cord and canal (normal, uncompressed).
  ap0 = rng.uniform(6.9, 7.3)
  ap_enlarge = rng.uniform(0.4, 0.8)
  c5 = body_centers[3]
  cord_ap = ap0 + ap_enlarge * plateau(s, c5, 12.0, 14.0)
  # Cervicomedullary junction: the cord widens towards the medulla above C2.
  cord_ap = cord_ap + np.clip(0.06 * (8.0 - s), 0.0, 2.5)
  w0 = rng.uniform(5.0, 5.5)
  cord_w = w0 + rng.uniform(0.6, 1.0) * plateau(s, c5, 12.0, 16.0) + np.clip(0.05 * (8.0 - s), 0, 2.0)
  canal0 = rng.uniform(14.0, 17.0)
  # Larger canal at C1 / C2 (the atlas ring is wide).
  canal = canal0 + 1.5 * plateau(s, body_centers[0], 6.0, 10.0) + np.clip(0.35 * (14.0 - s), 0.0, 6.0)
  epi_ant = rng.uniform(1.0, 1.8)
  epi_post = rng.uniform(2.0, 3.2)
  sac = canal - epi_ant - epi_post
  ant_fraction = rng.uniform(0.38, 0.48)
  csf_ant = np.maximum(sac - cord_ap, 1.5) * ant_fraction
  t_pvb = -(cord_ap / 2.0 + csf_ant + epi_ant)
  # Small retro/anterolisthesis of individual bodies.
  shift = rng.normal(0.0, 0.4, NUM_BODIES)
  t_pvb = t_pvb + _piecewise_by_body(s, body_centers, shift)
  t_lam = t_pvb + canal
  sac_lo = t_pvb + epi_ant
  sac_hi = t_lam - epi_post
  sac_w = rng.uniform(8.5, 10.0) * k + np.clip(0.1 * (10.0 - s), 0.0, 3.0)

  depth = _piecewise_by_body(s, body_centers, depths)
  dens = (s < DENS_LENGTH * k)
  depth = np.where(dens, np.minimum(depth, DENS_DEPTH * k), depth)
  col_hw = _piecewise_by_body(s, body_centers, half_widths)

  # ---- degeneration, stenosis and where lesions go.
  num_seg = len(labels.SEGMENT_NAMES)
  weights = LEVEL_WEIGHTS / LEVEL_WEIGHTS.sum()
  lesion_levels: list[int] = []
  stenotic: set[int] = set()
  if lesion:
    first = int(rng.choice(num_seg, p=weights))
    lesion_levels.append(first)
    if rng.random() < 0.25:  # a second lesion at another compressed level
      rest = weights.copy()
      rest[first] = 0.0
      lesion_levels.append(int(rng.choice(num_seg, p=rest / rest.sum())))
    stenotic.update(lesion_levels)
  if not healthy_profile:
    # Compression without signal change is common in DCM: extra stenotic levels for everyone,
    # so that compression alone does not identify the lesion subjects.
    extra = int(rng.choice([0, 1, 1, 2, 2, 3]))
    for _ in range(extra):
      stenotic.add(int(rng.choice(num_seg, p=weights)))
  targets: dict[int, float] = {}
  fronts: dict[int, float] = {}
  b_peaks = np.zeros(NUM_DISCS)
  f_peaks = np.zeros(NUM_DISCS)
  b_shapes = np.zeros((NUM_DISCS, s.size))
  f_shapes = np.zeros((NUM_DISCS, s.size))
  osteo_weight = np.zeros_like(s)
  osteophytic = np.zeros(NUM_DISCS, bool)
  soft_protrusion = np.zeros(NUM_DISCS, bool)
  modic = np.zeros(NUM_DISCS, bool)
  for d in range(NUM_DISCS):
    sd = disc_centers[d]
    i = int(np.clip(np.searchsorted(s, sd), 0, s.size - 1))
    flat = 0.5 * disc_h[d] + rng.uniform(0.3, 1.5)
    tail = rng.uniform(3.0, 5.5)
    b_shapes[d] = plateau(s, sd, flat, tail)
    f_shapes[d] = plateau(s, sd + rng.uniform(0.5, 2.5), 2.0, rng.uniform(3.0, 5.0))
    if d in stenotic:
      targets[d] = rng.uniform(0.45, 0.8) if d in lesion_levels else rng.uniform(0.35, 0.8)
      indent = (sac_hi[i] - sac_lo[i]) - targets[d] * cord_ap[i] - 0.3
      fronts[d] = rng.uniform(0.6, 0.9)
      b_peaks[d], f_peaks[d] = fronts[d] * indent, (1.0 - fronts[d]) * indent
      degeneration[d] = max(degeneration[d], rng.uniform(0.6, 1.0))
    elif degeneration[d] > 0.45 and not healthy_profile:
      # Bulge that effaces the anterior CSF without reaching the cord.
      b_peaks[d] = rng.uniform(0.3, 0.75) * csf_ant[i]
      f_peaks[d] = rng.uniform(0.0, 0.5)
    elif degeneration[d] > 0.3:
      b_peaks[d] = rng.uniform(0.0, 0.5)
    if b_peaks[d] > 0:
      osteophytic[d] = (not healthy_profile) and rng.random() < 0.35 and b_peaks[d] > 1.0
      soft_protrusion[d] = degeneration[d] < 0.75 and rng.random() < 0.5
      if osteophytic[d]:
        # Spurs at the two endplate corners; the disc fills the middle.
        corners = np.maximum(plateau(s, bottom[d], 0.8, 2.0), plateau(s, top[d + 1], 0.8, 2.0))
        osteo_weight = np.maximum(osteo_weight, corners * b_shapes[d])
    modic[d] = (not healthy_profile) and degeneration[d] > 0.6 and rng.random() < 0.3

  # Cord after compression: pushed in from the front by the bulge, from the back by the flavum.
  # The smooth (soft max / min) contact flattens the cord a little more than the indentation
  # alone, so the stenotic indentations are corrected until each level's compression ratio
  # (narrowest cord AP / normal AP near the disc) equals its target.
  residual = 0.15
  windows = {d: np.abs(s - disc_centers[d]) < 0.5 * disc_h[d] + 3.0 for d in targets}

  def compose():
    bulge = np.max(b_peaks[:, None] * b_shapes, axis=0)
    flavum = np.max(f_peaks[:, None] * f_shapes, axis=0)
    lo = soft_max(-cord_ap / 2.0, sac_lo + bulge + residual)
    hi = np.maximum(soft_min(cord_ap / 2.0, sac_hi - flavum - residual), lo + 0.5)
    return bulge, flavum, lo, hi

  for _ in range(6):
    bulge, flavum, cord_lo, cord_hi = compose()
    for d, target in targets.items():
      w = windows[d]
      actual = float(np.min((cord_hi - cord_lo)[w] / cord_ap[w]))
      change = (actual - target) * float(np.mean(cord_ap[w]))
      b_peaks[d] = max(b_peaks[d] + fronts[d] * change, 0.0)
      f_peaks[d] = max(f_peaks[d] + (1.0 - fronts[d]) * change, 0.0)
  bulge, flavum, cord_lo, cord_hi = compose()
  compression = {DISC_NAMES[d]: float(np.min((cord_hi - cord_lo)[windows[d]] / cord_ap[windows[d]]))
                 for d in sorted(targets)}
  squash = np.clip(cord_ap / np.maximum(cord_hi - cord_lo, 1e-3), 1.0, 3.0)
  cord_w = cord_w * squash ** 0.3  # a flattened cord widens

  # ---- posterior elements.
  lamina_center = np.concatenate([[DENS_LENGTH * k * 0.8], body_centers + 0.3 * heights])
  lamina_half = np.concatenate([[4.5 * k], 0.36 * heights])
  lamina_half[1] = 0.3 * heights[0]  # C2 lamina is big but sits at its body
  lamina_center[1] = top[0] + 0.62 * heights[0]
  spinous = SPINOUS_LENGTH * k * rng.uniform(0.85, 1.15, SPINOUS_LENGTH.size)
  spinous_slope = rng.uniform(0.45, 0.8)

  # ---- head: foramen magnum, occiput.
  s_fm = -rng.uniform(5.0, 8.0) * k

  # ---- surrounding soft tissue (t positions relative to the cord centreline).
  post_depth = rng.uniform(62.0, 80.0) * k
  skin_post = (post_depth + rng.uniform(6, 14) * plateau(s, body_centers[6], 15.0, 40.0)
               - rng.uniform(4, 10) * plateau(s, body_centers[2], 10.0, 30.0))
  fat_post = rng.uniform(6.0, 14.0) * k + rng.uniform(2, 10) * plateau(s, body_centers[6], 20.0, 40.0)
  # Occiput: bone curving posteriorly above the opisthion; the scalp follows it.
  opisthion = np.interp(s_fm, s, t_lam) + 2.0
  above = np.maximum(s_fm - s, 0.0)
  t_occ = opisthion + rng.uniform(0.9, 1.3) * above - rng.uniform(0.003, 0.006) * above ** 2
  occ_thick = rng.uniform(5.0, 7.0)
  skin_post = np.where(s < s_fm + 10.0, np.maximum(skin_post, t_occ + occ_thick + rng.uniform(8.0, 12.0)),
                       skin_post)
  t_avb = t_pvb - depth
  c4, c6, t1 = body_centers[2], body_centers[4], body_centers[6]
  prev = rng.uniform(3.0, 5.0) + rng.uniform(7.0, 11.0) * np.clip((s - c4) / max(c6 - c4, 1.0), 0.0, 1.0)
  prev = prev + np.clip(0.25 * (0.0 - s), 0.0, 12.0)  # adenoids / longus capitis above C2
  airway = rng.uniform(10.0, 15.0) * np.ones_like(s)
  airway = airway - rng.uniform(3.0, 6.0) * plateau(s, 0.5 * (c4 + c6), 1.5, 3.0)  # glottis
  fat_ant = rng.uniform(3.0, 8.0)
  skin = rng.uniform(1.5, 2.5)
  t_air_hi = t_avb - prev
  t_air_lo = t_air_hi - airway
  # Anterior skin: a smooth neck contour, deeper towards the chin (top) and the chest (bottom).
  neck_front = rng.uniform(60.0, 72.0) * k
  chin = softplus(rng.uniform(0.9, 1.4) * (body_centers[1] - s), 8.0)
  chest = softplus(rng.uniform(0.6, 0.9) * (s - t1), 8.0)
  skin_ant = -(neck_front + np.minimum(chin, 110.0) + np.minimum(chest, 70.0))
  skin_ant = soft_min(skin_ant, t_air_lo - 10.0 - fat_ant - skin, 3.0)

  # Lateral drift of the cord midline (patient offset + mild scoliosis) (mm).
  drift = rng.uniform(-1.5, 1.5) + rng.uniform(0.0, 2.0) * np.sin(
      np.pi * (s - rng.uniform(0.0, 60.0)) / rng.uniform(100.0, 180.0))

  profiles = dict(
      t_pvb=t_pvb, depth=depth, col_hw=col_hw, t_lam=t_lam, sac_lo=sac_lo, sac_hi=sac_hi,
      sac_w=sac_w, bulge=bulge, osteo=bulge * osteo_weight, flavum=flavum, cord_lo=cord_lo,
      cord_hi=cord_hi, cord_w=cord_w, cord_ap=cord_ap, skin_post=skin_post, fat_post=fat_post,
      t_occ=t_occ, prev=prev, t_air_hi=t_air_hi, t_air_lo=t_air_lo, skin_ant=skin_ant, drift=drift)
  profiles = {name: np.asarray(v, np.float32) for name, v in profiles.items()}

  # ---- centreline in the image frame: y(z) with lordosis, tilt and a cubic asymmetry.
  curvature = str(rng.choice(["lordotic", "straight", "kyphotic"], p=[0.55, 0.25, 0.2]))
  amplitude = {"lordotic": rng.uniform(5.0, 13.0), "straight": rng.uniform(-2.0, 2.0),
               "kyphotic": rng.uniform(-9.0, -3.0)}[curvature]
  half_span = 75.0
  z_dens = fov_si / 2.0 - rng.uniform(68.0, 76.0)
  z_mid = z_dens + body_centers[3]  # around C5
  tilt = rng.uniform(0.0, 0.25)
  cubic = rng.uniform(-3.0, 3.0)
  y_mid = fov_ap / 2.0 + rng.uniform(4.0, 14.0)
  # y(z) = y_mid + tilt (z - z_mid) + A q^2 + c q^3 with q = (z - z_mid) / half_span.
  poly = np.polynomial.Polynomial([0.0, 0.0, amplitude, cubic])
  poly = poly(np.polynomial.Polynomial([-z_mid / half_span, 1.0 / half_span]))
  poly = poly + np.polynomial.Polynomial([y_mid - tilt * z_mid, tilt])
  centreline = poly.coef.astype(np.float64)

  # ---- CSF flow voids: dark pulsatile-flow blobs in the upper cervical CSF.
  flow_voids = []
  if rng.random() < 0.7:
    for _ in range(int(rng.integers(1, 5))):
      sv = rng.uniform(-5.0, body_centers[3])
      front = rng.random() < 0.5
      flow_voids.append((float(sv), 1.0 if front else -1.0, float(rng.uniform(3.0, 10.0)),
                         float(rng.uniform(0.8, 1.6)), float(rng.uniform(0.35, 0.8))))

  c1_anterior = (DENS_LENGTH * k * 0.55, float(np.interp(5.0, s, t_pvb)) - DENS_DEPTH * k - 1.5 - 4.0 * k,
                 5.5 * k, 4.2 * k)

  anatomy = Anatomy(
      scale=k, curvature=curvature, centreline=centreline, s_of_dens=z_dens, body_top=top,
      body_bottom=bottom, disc_degeneration=degeneration, compression=compression,
      s_foramen_magnum=s_fm, profiles=profiles, lesions=[], osteophytic=osteophytic,
      soft_protrusion=soft_protrusion, modic=modic, flow_voids=flow_voids,
      lamina_center=lamina_center, lamina_half_height=lamina_half, spinous_length=spinous,
      spinous_slope=spinous_slope, c1_anterior=c1_anterior,
      misc=dict(epi_ant=epi_ant, epi_post=epi_post, skin=skin, fat_ant=fat_ant,
                occ_thick=occ_thick))
  if lesion:
    anatomy.lesions = _sample_lesions(rng, anatomy, lesion_levels, grade, slice_positions)
  return anatomy


def _sample_lesions(rng: np.random.Generator, anatomy: Anatomy, levels: list[int],
                    grade: int | None, slice_positions: np.ndarray | None) -> list[Lesion]:
  """Lesions at the given compressed levels (segment indices)."""
  s = S_GRID
  # Draws are made whether or not the grade is forced, so forcing it changes nothing else.
  drawn_grade = int(rng.integers(1, 3))
  primary_grade = int(grade) if grade is not None else drawn_grade
  c2 = anatomy.body_center(0)
  t1 = anatomy.body_center(6)
  lesions = []
  for n, level in enumerate(levels):
    drawn_grade = int(rng.integers(1, primary_grade + 1))
    g = primary_grade if (n == 0 or grade is not None) else drawn_grade
    pencil = rng.random() < 0.18
    # Sharp grade-2 lesions are the larger ones (a small one would blur below its grade).
    shortest = 1.5 if g == 1 else 2.5
    half_length = rng.uniform(5.0, 15.0) if pencil else rng.uniform(shortest, 7.5)
    center = anatomy.disc_center(level) + rng.uniform(-2.5, 2.5)
    # Stay between the C2 and T1 centroids so every lesion voxel falls in a scored segment.
    half_length = min(half_length, center - c2 - 4.0, t1 - center - 4.0)
    half_length = max(half_length, shortest)
    ap_mm = rng.uniform(1.5, 3.5) if g == 1 else rng.uniform(2.5, 4.0)
    drift = float(np.interp(center, s, anatomy.profiles["drift"]))
    if slice_positions is not None and len(slice_positions):
      nearest = float(slice_positions[np.argmin(np.abs(np.asarray(slice_positions) - drift))])
      spacing = float(np.min(np.diff(np.sort(slice_positions)))) if len(slice_positions) > 1 else 3.0
    else:
      nearest, spacing = drift, 1.0
    u_center = nearest + rng.uniform(-0.15, 0.15) * spacing
    cord_w = float(np.interp(center, s, anatomy.profiles["cord_w"]))
    # Wide enough that a thick slice through it still sees mostly lesion, narrow enough to
    # stay inside the cord ellipse even when off-centre.
    widest = 0.5 * spacing + 1.5
    half_width = min(rng.uniform(max(1.5, (0.45 if g == 1 else 0.6) * spacing), max(2.0, widest)),
                     0.8 * cord_w - abs(u_center - drift))
    half_width = max(half_width, 1.0)
    xi_center = rng.uniform(-0.15, 0.15)
    warp = np.array([rng.uniform(0.0, 0.25) * half_length, rng.uniform(0.8, 2.0), rng.uniform(0, 2 * np.pi),
                     rng.uniform(0.0, 0.12), rng.uniform(0.5, 1.5) / half_length, rng.uniform(0, 2 * np.pi)])
    target = rng.uniform(1.25, 1.45) if g == 1 else rng.uniform(1.6, 2.1)
    lesions.append(Lesion(grade=g, level=labels.SEGMENT_NAMES[level], s_center=float(center),
                          half_length=float(half_length), ap_mm=float(ap_mm), half_width=float(half_width),
                          xi_center=float(xi_center), u_center=float(u_center), warp=warp,
                          target_ratio=float(target), pencil=bool(pencil)))
  return lesions
