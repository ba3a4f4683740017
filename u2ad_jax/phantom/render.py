"""Object model of one synthetic subject: tissue signal and labels of each sagittal slice.

The renderer turns an `Anatomy` (`anatomy`) into, per sagittal slice, the noise-free
object signal BEFORE acquisition effects (so lesion and normal tissue later share blur, bias and
noise), the label map and the vertebra instance map. Everything is evaluated analytically per
pixel from the cord coordinates (s, t) of the pixel and the lateral position u of the slice,
with edges ramped over one pixel (anti-aliased partial volume). A thick slice is the average of
several thin sub-slices, which gives through-plane partial volume.

Tissue signals and textures come from `tissue`, the pixels' cord coordinates from `cord_frame`.
The module is longer than the others (about 470 lines) because `Renderer` is one class: it paints
every structure over the same per-pixel coordinates in a fixed order (later paint covers earlier
paint, and the random draws follow that order), so the order is the object and stays in one place.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from u2ad_jax import labels as L
from u2ad_jax.phantom import anatomy as pa
from u2ad_jax.phantom import cord_frame
from u2ad_jax.phantom import tissue


def ramp(inside: np.ndarray, edge: float) -> np.ndarray:
  """Soft occupancy from a signed inside-distance (mm): 0 outside, 1 inside, linear over `edge`."""
  return np.clip(inside * (1.0 / edge) + 0.5, 0.0, 1.0)


def lateral(u: np.ndarray | float, half_width: np.ndarray | float, power: float = 2.0) -> np.ndarray:
  """Superellipse profile (1 - |u / w|^p)^(1/p): a structure's AP extent at lateral offset u."""
  return np.clip(1.0 - np.abs(u / half_width) ** power, 0.0, 1.0) ** (1.0 / power)


def rounded_box(ds: np.ndarray, dt: np.ndarray, hs: np.ndarray | float, ht: np.ndarray | float,
                power: int = 6) -> np.ndarray:
  """Approximate signed inside-distance (mm) of a superellipse box of half sizes (hs, ht)."""
  a = (ds / hs) ** 2
  b = (dt / ht) ** 2
  r = (a ** (power // 2) + b ** (power // 2)) ** (1.0 / power)
  return (1.0 - r) * np.minimum(hs, ht)


@dataclasses.dataclass
class SliceObject:
  """The rendered object of one slice (before acquisition).

  Attributes:
    signal: `[H, W]` float32 object signal without lesions.
    lesion_delta: list per lesion of `[H, W]` float32 (or None where the lesion misses the slice):
      the slice signal is `signal + sum_j kappa_j * lesion_delta[j]`, kappa_j = ratio_j - 1.
    labels: `[H, W]` uint8 label map (centre of the slice).
    vertebrae: `[H, W]` uint8 vertebra instance ids.
    lesion_ids: `[H, W]` uint8, 1 + index of the lesion owning each lesion voxel, else 0.
    csf: `[H, W]` float32 CSF signal component (source of pulsation ghosts).
  """
  signal: np.ndarray
  lesion_delta: list
  labels: np.ndarray
  vertebrae: np.ndarray
  lesion_ids: np.ndarray
  csf: np.ndarray


class Renderer:
  """Renders the sagittal slices of one subject.

  Construction precomputes everything that does not depend on the lateral position (the
  lateral-invariant soft tissue background, gathered profiles, posterior-element shapes), so a
  slice costs a few dozen array operations per sub-slice.
  """

  def __init__(self, anatomy: pa.Anatomy, frame: cord_frame.Frame, signals: dict[str, float],
               rng: np.random.Generator):
    self.a = anatomy
    self.f = frame
    self.sig = signals
    self.rng = rng
    self.e = frame.pixel  # edge ramp width (mm): one pixel
    self._derive_profiles()
    self._precompute()

  # ------------------------------------------------------------------ per-subject preparation
  def _derive_profiles(self):
    a, s = self.a, pa.S_GRID
    body_c = 0.5 * (a.body_top + a.body_bottom)
    disc_c = 0.5 * (a.body_bottom[:-1] + a.body_top[1:])
    body_id = np.searchsorted(disc_c, s).astype(np.int32)
    self.p_body_id = body_id
    self.p_body_cs = body_c[body_id].astype(np.float32)
    self.p_body_hh = (0.5 * (a.body_bottom - a.body_top))[body_id].astype(np.float32)
    disc_id = np.clip(np.searchsorted(body_c, s) - 1, 0, pa.NUM_DISCS - 1)
    self.p_disc_cs = disc_c[disc_id].astype(np.float32)
    self.p_disc_hh = (0.5 * (a.body_top[1:] - a.body_bottom[:-1]))[disc_id].astype(np.float32)
    self.p_disc_deg = a.disc_degeneration[disc_id].astype(np.float32)
    env = np.zeros_like(s)
    modic = np.zeros_like(s)
    for k in range(pa.NUM_DISCS):
      lo, hi = a.body_bottom[k], a.body_top[k + 1]
      env = np.maximum(env, ((s > lo - 1.2) & (s < hi + 1.2)).astype(float))
      if a.modic[k]:
        modic = np.maximum(modic, pa.plateau(s, 0.5 * (lo + hi), 0.5 * (hi - lo) + 2.0, 2.0))
    self.p_disc_env = env.astype(np.float32)
    self.p_modic = modic.astype(np.float32)
    self.p_soft = a.soft_protrusion[disc_id].astype(np.float32)
    lam_mid = 0.5 * (a.lamina_center[1:] + a.lamina_center[:-1])
    lam_id = np.searchsorted(lam_mid, s).astype(np.int32)
    self.p_lam_id = lam_id
    self.s_end = a.body_bottom[-1] + 2.0  # below the last body: no more bodies

  def _precompute(self):
    f, a, P = self.f, self.a, self.a.profiles
    g = f.g
    S, T = f.s, f.t
    e = self.e
    sig = self.sig
    self.G = {name: g(P[name], name) for name in P}
    G = self.G
    G["body_cs"], G["body_hh"] = g(self.p_body_cs), g(self.p_body_hh)
    G["body_id"] = g(self.p_body_id)
    G["disc_cs"], G["disc_hh"], G["disc_deg"] = g(self.p_disc_cs), g(self.p_disc_hh), g(self.p_disc_deg)
    G["disc_env"], G["modic"], G["soft"] = g(self.p_disc_env), g(self.p_modic), g(self.p_soft)
    s_fm = a.s_foramen_magnum
    self.below_fm = (S >= s_fm).astype(np.float32)
    rows_head = np.flatnonzero((S < s_fm + 4.0).any(axis=1))
    self.head_rows = slice(0, int(rows_head[-1]) + 1) if rows_head.size else slice(0, 0)

    # Lateral-invariant background: skin, subcutaneous fat, muscle, fat planes, anterior neck.
    img = np.zeros(S.shape, np.float32)
    amp = np.zeros(S.shape, np.float32)
    rng = self.rng
    skin = a.misc["skin"]
    fat_ant = a.misc["fat_ant"]

    def paint(m, value, tex):
      img[...] += m * (value - img)
      amp[...] += m * (tex - amp)

    inside_body = np.minimum(T - G["skin_ant"], G["skin_post"] - T)
    paint(ramp(inside_body, e), sig["skin"], tissue.TEXTURE["skin"])
    # Fat septa: thin dark lines along the zero crossings of a fine random field.
    septa = tissue.smooth_noise(rng, S.shape, 1.6 / f.pixel)
    fat_signal = sig["fat"] * (1.0 - 0.35 * np.exp(-(septa / 0.12) ** 2))
    paint(ramp(inside_body - skin, e), fat_signal, tissue.TEXTURE["fat"])
    muscle_in = np.minimum(T - (G["skin_ant"] + skin + fat_ant), (G["skin_post"] - skin - G["fat_post"]) - T)
    paint(ramp(muscle_in, e), sig["muscle"], tissue.TEXTURE["muscle"])
    # Intermuscular fat planes of the posterior neck (thin bright curved lines).
    back = G["skin_post"] - skin - G["fat_post"]
    depth_back = np.maximum(back - G["t_lam"], 1.0)
    behind_occiput = (S > s_fm + 2.0) | (T > G["t_occ"] + a.misc["occ_thick"] + 1.0)
    for frac in (0.22, 0.42, 0.6, 0.78):
      fr = frac + rng.uniform(-0.05, 0.05)
      wig = _wave(rng, S, (0.3, 1.2), (25.0, 80.0)) + _wave(rng, S, (0.3, 1.2), (25.0, 80.0))
      centre = G["t_lam"] + fr * depth_back + wig.astype(np.float32)
      # Thickness wanders between 0 (the plane fades) and ~2 mm along the neck.
      scale = rng.uniform(0.3, 0.9)
      half = scale * (1.0 + _wave(rng, S, (1.0, 1.0), (20.0, 60.0)))
      m = ramp(half - np.abs(T - centre), e) * behind_occiput
      paint(m, sig["fat"], tissue.TEXTURE["fat"])
    # Anterior neck soft tissue (strap muscles, glands), prevertebral tissue, thyroid.
    paint(ramp(np.minimum(T - (G["skin_ant"] + skin + fat_ant), G["t_air_lo"] - T), e), sig["neck_soft"],
          tissue.TEXTURE["neck_soft"])
    paint(ramp(np.minimum(T - G["t_air_hi"], G["t_pvb"] - G["depth"] + 0.5 - T), e), sig["prevertebral"],
          tissue.TEXTURE["prevertebral"])
    thy_s = a.body_center(5)
    thy = rounded_box(S - thy_s, T - (G["t_air_lo"] - 6.0), 14.0, 5.0, 2)
    paint(ramp(thy, e), sig["thyroid"], 0.05)
    self.base = img
    self.base_amp = amp

    # Posterior elements (shape is lateral-invariant; the lateral extent is applied per slice).
    t_lam = G["t_lam"]
    v = T - t_lam
    s_eff = S - a.spinous_slope * np.maximum(v, 0.0)
    idx = np.clip(np.rint((s_eff - pa.S_MIN) / pa.S_STEP), 0, pa.S_GRID.size - 1).astype(np.int32)
    lam = self.p_lam_id[idx]
    lam_c = a.lamina_center[lam].astype(np.float32)
    lam_h = a.lamina_half_height[lam].astype(np.float32)
    sp_len = a.spinous_length[lam].astype(np.float32)
    w = s_eff - lam_c
    self.d_lamina = rounded_box(w, v - 2.0, lam_h, 3.0, 4)
    taper = 5.0 - 1.8 * np.clip(v / sp_len, 0.0, 1.0)
    self.d_spinous = rounded_box(w, v - 0.5 * (sp_len + 3.0), taper, np.maximum(0.5 * (sp_len - 3.0), 1.0), 4)
    self.d_lamina = np.where(S > s_fm + 3.0, self.d_lamina, -99.0).astype(np.float32)
    self.d_spinous = np.where(S > s_fm + 3.0, self.d_spinous, -99.0).astype(np.float32)

    # Vertebral-body shape in s (lateral-invariant part).
    self.body_ds = S - G["body_cs"]

    # CSF flow voids: multiplicative signal loss of the CSF in (s, t) blobs.
    void = np.ones(S.shape, np.float32)
    for sv, side, rs, rt, depth in a.flow_voids:
      tv = np.where(side > 0, 0.5 * (G["sac_lo"] + G["cord_lo"]), 0.5 * (G["sac_hi"] + G["cord_hi"]))
      q = ((S - sv) / rs) ** 2 + ((T - tv) / rt) ** 2
      void *= 1.0 - depth * np.exp(-q)
    # Pulsatile flow dephasing: patchy CSF signal loss (mm-scale dark patches), beyond the voids.
    patch = tissue.smooth_noise(rng, S.shape, 2.0 / f.pixel)
    void *= 1.0 - a.misc["csf_patchiness"] * np.clip(patch, 0.0, 2.5) / 2.5
    self.void = void.astype(np.float32)

  # ------------------------------------------------------------------ one slice
  def render_slice(self, x: float, sub_offsets: np.ndarray, tex_low: np.ndarray,
                   tex_fine: np.ndarray) -> SliceObject:
    """Renders the slice centred at lateral position x (mm).

    Args:
      x: slice centre (mm, right positive).
      sub_offsets: `[K]` lateral offsets (mm) of the thin sub-slices averaged into the slice;
        the one closest to 0 gives the labels.
      tex_low: `[H, W]` unit-variance low-frequency texture field of this slice.
      tex_fine: `[H, W]` unit-variance fine texture (trabecular / folia).
    """
    shape = self.f.s.shape
    # Lateral-invariant background textured per slice; textured signals shared by sub-slices.
    textured_base = self.base * (1.0 + self.base_amp * tex_low)
    signals = {
        "marrow": self.sig["marrow"] * (1.0 + tissue.TEXTURE["marrow"] * tex_low + 0.14 * tex_fine),
        "marrow_posterior": self.sig["marrow_posterior"] * (1.0 + 0.06 * tex_low + 0.14 * tex_fine),
        "cord": self.sig["cord"] * (1.0 + tissue.TEXTURE["cord"] * tex_low),
        "csf": self.sig["csf"] * (1.0 + tissue.TEXTURE["csf"] * tex_low) * self.void,
        "cerebellum": self.sig["cerebellum"] * (1.0 + tissue.TEXTURE["cerebellum"] * tex_low + 0.08 * tex_fine),
    }
    centre = int(np.argmin(np.abs(sub_offsets)))
    total = np.zeros(shape, np.float32)
    csf_total = np.zeros(shape, np.float32)
    deltas: list = [None] * len(self.a.lesions)
    lab = vert = les = None
    for i, off in enumerate(sub_offsets):
      want = i == centre
      out = self._render_sub(x + float(off), textured_base, signals, want)
      total += out["img"]
      csf_total += out["csf"]
      for j, d in enumerate(out["deltas"]):
        if d is not None:
          deltas[j] = d if deltas[j] is None else deltas[j] + d
      if want:
        lab, vert, les = out["labels"], out["vertebrae"], out["lesion_ids"]
    n = float(len(sub_offsets))
    deltas = [None if d is None else d / n for d in deltas]
    return SliceObject(signal=total / n, lesion_delta=deltas, labels=lab, vertebrae=vert,
                       lesion_ids=les, csf=csf_total / n)

  def _render_sub(self, x: float, base: np.ndarray, signals: dict, want_labels: bool) -> dict:
    a, G, sig, e = self.a, self.G, self.sig, self.e
    S, T = self.f.s, self.f.t
    img = base.copy()
    lab = np.zeros(S.shape, np.uint8) if want_labels else None
    vert = np.zeros(S.shape, np.uint8) if want_labels else None
    u = x - G["drift"]
    au = np.abs(u)
    s_fm = a.s_foramen_magnum
    below = self.below_fm

    def paint(m, value, label=None, where=None):
      img[...] += m * (value - img)
      if want_labels and label is not None:
        sel = m > 0.5 if where is None else (m > 0.5) & where
        np.putmask(lab, sel, label)

    # Airway (pharynx / trachea): narrower laterally.
    air_mid = 0.5 * (G["t_air_lo"] + G["t_air_hi"])
    air_half = 0.5 * (G["t_air_hi"] - G["t_air_lo"]) * lateral(u, 11.0, 2.0)
    paint(ramp(air_half - np.abs(T - air_mid), e), 0.0)

    # Canal contents outside the dura: epidural fat and veins.
    sac_w = G["sac_w"]
    canal_in = np.minimum(np.minimum(T - G["t_pvb"], G["t_lam"] - T), sac_w + 5.0 - au)
    paint(ramp(canal_in, e) * below, 0.85 * sig["fat"])

    # Lateral elements: pedicles, articular pillars with facet joints, roots, vertebral artery.
    lat_in = au - sac_w
    body_in_s = G["body_hh"] - 1.5 - np.abs(self.body_ds)
    ped = np.minimum(np.minimum(T - (G["t_pvb"] - 1.0), G["t_pvb"] + 6.0 - T), body_in_s)
    ped = np.minimum(ped, np.minimum(lat_in + 0.5, sac_w + 7.0 - au))
    if float(ped.max()) > -e:
      paint(ramp(ped, e), self.sig["cortex"])
      paint(ramp(ped - 1.0, e), signals["marrow_posterior"])
    pillar = np.minimum(np.minimum(T - (G["t_pvb"] + 6.0), G["t_lam"] + 4.0 - T), lat_in - 3.0)
    pillar = np.minimum(pillar, S - (s_fm + 4.0))
    if float(pillar.max()) > -e:
      paint(ramp(pillar, e), self.sig["cortex"])
      paint(ramp(pillar - 1.0, e), signals["marrow_posterior"])
      # Facet joints: a tilted gap at each disc level, cortical lines either side of the fluid.
      t_mid = 0.5 * (G["t_pvb"] + G["t_lam"])
      gap = np.abs((S - G["disc_cs"] - 1.5) + 0.7 * (T - t_mid)) / 1.22
      paint(ramp(np.minimum(1.6 - gap, pillar + 1.0), e), sig["cortex"])
      paint(ramp(np.minimum(0.6 - gap, pillar), e), sig["joint"])
      root_q = ((S - (G["disc_cs"] - 1.5)) / 2.2) ** 2 + ((T - (G["t_pvb"] + 3.5)) / 2.0) ** 2
      root = np.minimum((1.0 - root_q) * 2.0, np.minimum(lat_in, sac_w + 8.0 - au))
      paint(ramp(root, e), sig["nerve"])
    art = np.minimum(2.2 - np.abs(au - 15.0), np.minimum(T - (G["t_pvb"] - 6.5), G["t_pvb"] - 2.5 - T))
    art = np.minimum(art, np.minimum(S - (s_fm - 10.0), a.body_center(4) - S))
    if float(art.max()) > -e:
      paint(ramp(art, e), 0.02 * sig["csf"])

    # Anterior column: discs (annulus + nucleus), protrusions / osteophytes, then bodies.
    col_lat = lateral(u, G["col_hw"], 4.0)
    dep = G["depth"] * col_lat
    t_post = G["t_pvb"]
    bulge = G["bulge"] * lateral(u, 9.0, 2.0)
    col_on = col_lat > 0.0
    disc_band = np.minimum(T - (t_post - dep), t_post + 0.3 - T)
    disc_m = ramp(disc_band, e) * G["disc_env"] * col_on
    paint(disc_m, sig["annulus"], L.DISC)
    deg = G["disc_deg"]
    nuc_signal = (1.0 - deg) * sig["disc_nucleus"] + deg * sig["disc_desiccated"]
    nq = (((S - G["disc_cs"]) / (0.62 * G["disc_hh"])) ** 2
          + ((T - (t_post - 0.5 * dep)) / np.maximum(0.3 * dep, 0.5)) ** 2)
    paint(ramp((1.0 - nq) * 1.2, 1.2) * disc_m, nuc_signal)
    # PLL along the column; protruding disc material where the disc bulges beyond the wall.
    prot_hi = G["sac_lo"] + bulge
    prot = np.minimum(T - (t_post - 0.3), prot_hi - T)
    prot_signal = sig["protrusion"] + G["soft"] * (sig["soft_protrusion"] - sig["protrusion"]) * np.clip(
        (prot_hi - 0.6 - T) / 1.0, 0.0, 1.0) * (bulge > 1.0)
    paint(ramp(prot, e) * below * col_on, np.where(bulge > 0.3, prot_signal, sig["ligament"]), L.PROTRUSION,
          where=(bulge > 0.3) & (T > t_post + 0.2) & (G["disc_env"] > 0.5))
    osteo = G["osteo"] * lateral(u, 9.0, 2.0)
    ost = np.minimum(T - (t_post - 0.8), G["sac_lo"] + osteo - T)
    paint(ramp(ost, e) * (osteo > 0.2) * col_on, sig["cortex"] * 1.5, L.OTHER, where=T > t_post + 0.2)
    # Bodies: cortical rim, textured marrow (fatty next to Modic-degenerated endplates).
    hd = np.maximum(0.5 * dep, 0.3)
    body_d = rounded_box(self.body_ds, T - (t_post - 0.5 * dep), G["body_hh"], hd, 6)
    body_d = np.where(col_on & (S > -1.0) & (S < self.s_end), body_d, -99.0)
    bm = ramp(body_d, e)
    paint(bm, sig["cortex"], L.VERTEBRA)
    marrow = signals["marrow"] * (1.0 + 0.35 * G["modic"])
    paint(ramp(body_d - 0.9, e), marrow)
    if want_labels:
      np.putmask(vert, bm > 0.5, (G["body_id"] + 2).astype(np.uint8))

    # C1 anterior arch (in front of the dens).
    c1s, c1t, c1rs, c1rt = a.c1_anterior
    c1 = rounded_box(S - c1s, T - c1t, c1rs, c1rt, 2)
    c1 = np.minimum(c1, 14.0 - au)
    paint(ramp(c1, e), sig["cortex"])
    paint(ramp(c1 - 1.0, e), signals["marrow_posterior"])

    # Posterior: ligamentum flavum, laminae and spinous processes.
    flav = np.minimum(T - (G["sac_hi"] - G["flavum"] * lateral(u, 10.0, 2.0) - 0.3), G["t_lam"] + 2.5 - T)
    paint(ramp(flav, e) * (S > s_fm + 2.0) * (au < sac_w + 4.0), sig["ligament"])
    post = np.maximum(np.minimum(self.d_lamina, sac_w + 5.0 - au), np.minimum(self.d_spinous, 3.5 - au))
    paint(ramp(post, e), sig["cortex"])
    paint(ramp(post - 1.0, e), signals["marrow_posterior"])

    # Dural sac (CSF), indented by the bulge in front and the flavum behind.
    sac_c = 0.5 * (G["sac_lo"] + G["sac_hi"])
    sac_h = 0.5 * (G["sac_hi"] - G["sac_lo"]) * lateral(u, sac_w, 2.5)
    sac_lo = sac_c - sac_h + bulge
    sac_hi = sac_c + sac_h - G["flavum"] * lateral(u, 10.0, 2.0)
    sac_m = ramp(np.minimum(T - sac_lo, sac_hi - T), e) * (S > s_fm - 4.0)
    paint(sac_m, signals["csf"], L.CSF, where=S >= s_fm)
    csf_component = sac_m * signals["csf"]

    # Cord (+ central grey matter), clipped to the sac.
    cc = 0.5 * (G["cord_lo"] + G["cord_hi"])
    ca = 0.5 * (G["cord_hi"] - G["cord_lo"])
    cw = G["cord_w"]
    fl = lateral(u, cw, 2.0)
    cord_lo = np.maximum(cc - ca * fl, sac_lo)
    cord_hi = np.minimum(cc + ca * fl, sac_hi)
    cord_in = np.minimum(T - cord_lo, cord_hi - T)
    cord_m = ramp(cord_in, e) * (fl > 0.0) * (S > s_fm - 6.0)
    paint(cord_m, signals["cord"], L.CORD, where=S >= s_fm)
    gm = np.minimum(0.3 * ca * fl - np.abs(T - cc), 0.55 * cw - au)
    paint(ramp(gm, 0.8) * cord_m, signals["cord"] * self.a.misc.get("gm_boost", 1.06))

    # Lesions: membership in warped cord-normalised coordinates; kept as separate deltas.
    deltas: list = [None] * len(a.lesions)
    lesion_ids = np.zeros(S.shape, np.uint8) if want_labels else None
    if a.lesions:
      xi = (T - cc) / np.maximum(ca, 0.3)
      best = np.full(S.shape, np.inf, np.float32) if want_labels else None
      for j, les in enumerate(a.lesions):
        if abs(x - les.u_center) >= les.half_width:
          continue
        rows = self._rows_near(les.s_center, les.half_length + 4.0)
        if rows.stop <= rows.start:
          continue
        Sr, xr, car = S[rows], xi[rows], ca[rows]
        amp_s, fr_s, ph_s, amp_x, fr_x, ph_x = les.warp
        s_w = Sr + amp_s * np.sin(fr_s * np.pi * xr + ph_s)
        xi_w = xr + amp_x * np.sin(fr_x * (Sr - les.s_center) + ph_x)
        h_xi = np.minimum(les.ap_mm / 2.0 / np.maximum(car, 0.3), 0.6)
        d2 = (((s_w - les.s_center) / les.half_length) ** 2 + ((xi_w - les.xi_center) / h_xi) ** 2
              + ((x - les.u_center) / les.half_width) ** 2)
        if les.grade == 1:
          m = np.clip((1.0 - d2) / 0.8 + 0.5, 0.0, 1.0)  # fuzzy border (~40 % of the radius)
        else:
          r_min = np.minimum(h_xi * car, min(les.half_length, les.half_width))
          m = np.clip((1.0 - d2) * 0.5 * r_min / e + 0.5, 0.0, 1.0)  # sharp border (one pixel)
        m = m * cord_m[rows]
        if not m.any():
          continue
        delta = np.zeros(S.shape, np.float32)
        delta[rows] = m * img[rows]
        deltas[j] = delta
        if want_labels:
          inside = (d2 < 1.0) & (lab[rows] == L.CORD)
          closer = inside & (d2 < best[rows])
          best[rows] = np.where(closer, d2, best[rows])
          lesion_ids[rows] = np.where(closer, j + 1, lesion_ids[rows])
      if want_labels:
        np.putmask(lab, lesion_ids > 0, L.LESION)

    # Head: posterior fossa CSF, cerebellum, fourth ventricle, brainstem, clivus, occiput.
    self._paint_head(img, u, au, signals, cord_m)

    out = {"img": img, "csf": csf_component, "deltas": deltas}
    if want_labels:
      out.update(labels=lab, vertebrae=vert, lesion_ids=lesion_ids)
    return out

  def _rows_near(self, s0: float, half: float) -> slice:
    near = np.flatnonzero((np.abs(self.f.s - s0) < half).any(axis=1))
    return slice(int(near[0]), int(near[-1]) + 1) if near.size else slice(0, 0)

  def _paint_head(self, img, u, au, signals, cord_m):
    a, G, sig, e = self.a, self.G, self.sig, self.e
    rows = self.head_rows
    if rows.stop <= rows.start:
      return
    S, T = self.f.s[rows], self.f.t[rows]
    view = img[rows]
    s_fm = a.s_foramen_magnum
    up = np.maximum(s_fm - S, 0.0)
    i_fm = int(np.clip(np.rint((s_fm - pa.S_MIN) / pa.S_STEP), 0, pa.S_GRID.size - 1))
    P = a.profiles
    lo_fm, hi_fm, w_fm = float(P["cord_lo"][i_fm]), float(P["cord_hi"][i_fm]), float(P["cord_w"][i_fm])
    bs_lo = lo_fm - 0.3 * up
    bs_hi = hi_fm + 0.12 * up
    t_cl = bs_lo - 2.0 - 0.05 * up
    t_occ = G["t_occ"][rows]
    occ_thick = a.misc["occ_thick"]

    def paint(m, value):
      view[...] += m * (value - view)

    csf = signals["csf"][rows]
    head_in = np.minimum(np.minimum(T - t_cl, t_occ - T), s_fm - S)
    paint(ramp(head_in, e), csf)
    tonsil_t = bs_hi + 8.0
    cb_bottom = s_fm - 2.5 - 0.03 * (T - tonsil_t) ** 2
    cb = np.minimum(np.minimum(T - (bs_hi + 3.0), t_occ - 1.5 - T), cb_bottom - S)
    paint(ramp(cb, e), signals["cerebellum"][rows])
    v4 = 1.0 - ((S - (s_fm - 26.0)) / 9.0) ** 2 - ((T - (bs_hi + 3.5)) / 2.5) ** 2
    paint(ramp(v4 * 2.0, e), csf)
    fl = lateral(u[rows], w_fm + 0.25 * up, 2.0)
    bs_c = 0.5 * (bs_lo + bs_hi)
    bs_h = 0.5 * (bs_hi - bs_lo) * fl
    bs = np.minimum(bs_h - np.abs(T - bs_c), s_fm + 1.0 - S)
    paint(ramp(bs, e) * (fl > 0), signals["cord"][rows])
    clivus = np.minimum(np.minimum(T - (t_cl - 9.0), t_cl - T), s_fm - 0.5 - S)
    clivus = np.minimum(clivus, 14.0 - au[rows])
    paint(ramp(clivus, e), sig["cortex"])
    paint(ramp(clivus - 1.2, e), signals["marrow_posterior"][rows] * 1.1)
    occ = np.minimum(np.minimum(T - t_occ, t_occ + occ_thick - T), s_fm + 0.5 - S)
    paint(ramp(occ, e), sig["cortex"])
    paint(ramp(occ - 1.5, e), signals["marrow_posterior"][rows])


def _wave(rng: np.random.Generator, s: np.ndarray, amplitude: tuple[float, float],
          period: tuple[float, float]) -> np.ndarray:
  """A random sinusoid along s: amplitude, period (mm) and phase drawn in that order."""
  a = rng.uniform(*amplitude)
  p = rng.uniform(*period)
  return (a * np.sin(s * (2 * np.pi / p) + rng.uniform(0, 6.3))).astype(np.float32)

