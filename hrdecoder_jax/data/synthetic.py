"""Procedural fundus photographs with four lesion masks, and the ``synthetic_fundus`` tfds builder.

:func:`generate_fundus` is pure numpy and deterministic per seed. Sizes are defined relative to a
full-resolution IDRiD photograph (4288x2848, field-of-view radius about 1670 px) and scaled by the
field-of-view radius of the requested size, so a 512x512 image looks like a downsampled photograph
and a 2848x4288 one has MA dots a few pixels wide. Lesions smaller than one pixel are kept at one
pixel radius so every lesion type stays visible in tiny test images.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow_datasets as tfds

from hrdecoder_jax import LESIONS
from hrdecoder_jax.data.contract import _no_code_path, features

_F = np.float32
_REF_RADIUS = 1670.0  # field-of-view radius of a full-resolution IDRiD image, in pixels
_SPLIT_IDS = {"train": 0, "test": 1, "valid": 2}


def _upsample(grid: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear upsampling of a small [gh, gw] grid to [h, w] with separable gathers (deterministic,
    unlike a BLAS matmul whose summation order may depend on the thread count)."""
    gh, gw = grid.shape
    ys = np.linspace(0, gh - 1, h, dtype=_F)
    xs = np.linspace(0, gw - 1, w, dtype=_F)
    y0 = np.minimum(ys.astype(np.int64), gh - 2)
    x0 = np.minimum(xs.astype(np.int64), gw - 2)
    fy = (ys - y0)[:, None]
    fx = xs - x0
    rows = grid[:, x0] * (1 - fx) + grid[:, x0 + 1] * fx  # [gh, w]
    out = rows[y0] * (1 - fy)
    out += rows[y0 + 1] * fy
    return out


class _Canvas:
    """Three float32 colour planes plus four bool lesion planes, edited in small boxes."""

    def __init__(self, h: int, w: int):
        self.h, self.w = h, w
        self.ch: list[np.ndarray] = []
        self.masks = [np.zeros((h, w), bool) for _ in LESIONS]

    def box(self, cy: float, cx: float, ext_y: float, ext_x: float):
        y0, y1 = max(int(cy - ext_y) - 1, 0), min(int(cy + ext_y) + 2, self.h)
        x0, x1 = max(int(cx - ext_x) - 1, 0), min(int(cx + ext_x) + 2, self.w)
        if y0 >= y1 or x0 >= x1:
            return None
        dy = np.arange(y0, y1, dtype=_F)[:, None] - _F(cy)
        dx = np.arange(x0, x1, dtype=_F)[None, :] - _F(cx)
        return (slice(y0, y1), slice(x0, x1)), dy, dx

    def blob(self, cy, cx, r0, *, elong=1.0, angle=0.0, harm=(), reach=1.0):
        """Normalised radius rho_n [h_box, w_box] of an irregular rotated ellipse (1 on its border),
        or None if it misses the image. ``harm``: (k, amplitude, phase) radial harmonics."""
        amp = sum(abs(a) for _, a, _ in harm)
        ext = r0 * max(elong, 1 / elong) * (1 + amp) * reach + 2
        b = self.box(cy, cx, ext, ext)
        if b is None:
            return None
        sl, dy, dx = b
        c, s = math.cos(angle), math.sin(angle)
        u = (dx * _F(c) + dy * _F(s)) / _F(elong)
        v = (dy * _F(c) - dx * _F(s)) * _F(elong)
        rho = np.sqrt(u * u + v * v)
        if harm:
            th = np.arctan2(v, u)
            rad = np.ones_like(th)
            for k, a, ph in harm:
                rad += _F(a) * np.cos(_F(k) * th + _F(ph))
            rho /= rad * _F(r0)
        else:
            rho /= _F(r0)
        # The pixel nearest the centre always belongs to the lesion, so sub-pixel lesions of tiny
        # images still leave a mark in their mask.
        iy, ix = int(round(cy)) - sl[0].start, int(round(cx)) - sl[1].start
        if 0 <= iy < rho.shape[0] and 0 <= ix < rho.shape[1]:
            rho[iy, ix] = 0
        return sl, rho

    def darken(self, sl, alpha, k):
        for c in range(3):
            self.ch[c][sl] *= 1 - alpha * _F(k[c])

    def paint(self, sl, alpha, col):
        for c in range(3):
            p = self.ch[c][sl]
            p += alpha * (_F(col[c]) - p)


def _edge_alpha(rho, r_px, soft_px):
    """Opacity 1 inside, 0 outside, a linear ramp ``soft_px`` wide centred on the border (rho=1)."""
    return np.clip((1 - rho) * _F(r_px / soft_px) + _F(0.5), 0, 1)


def _harmonics(rng, irregularity):
    return tuple((k, rng.uniform(0, irregularity / k), rng.uniform(0, 2 * math.pi)) for k in (2, 3, 4, 5))


def _vessel_tree(rng, disc, fov_center, temporal, R, max_segments=900):
    """Segments (x0, y0, x1, y1, width, is_vein) of a branching tree rooted at the optic disc.

    Four arcades (superior/inferior temporal curving around the macula, superior/inferior nasal),
    each an artery/vein pair, plus two thin macular branches; widths taper and split at branches.
    """
    dx0, dy0 = disc
    segs = []
    stack = []
    for vein in (True, False):
        w0 = (0.0135 if vein else 0.0105) * R * rng.uniform(0.9, 1.1)
        off = rng.uniform(-0.18, 0.18)
        for sgn in (-1, 1):  # superior / inferior
            stack.append((dx0, dy0, temporal + sgn * rng.uniform(1.0, 1.35) + off, w0, -sgn * rng.uniform(0.05, 0.085)))
            stack.append((dx0, dy0, temporal + math.pi - sgn * rng.uniform(0.45, 0.9) + off, 0.8 * w0,
                          sgn * rng.uniform(0.0, 0.03)))
        stack.append((dx0, dy0, temporal + rng.uniform(-0.35, 0.35), 0.35 * w0, rng.normal(0, 0.03)))
    is_vein = [True] * 5 + [False] * 5
    stack = [(*s, v) for s, v in zip(stack, is_vein)]
    step, w_min = 0.035 * R, max(0.0022 * R, 0.35)
    while stack and len(segs) < max_segments:
        x, y, th, w, curv, vein = stack.pop()
        for _ in range(80):
            if w < w_min or len(segs) >= max_segments:
                break
            th += curv + rng.normal(0, 0.06)
            curv *= 0.95  # arcades bend around the macula, then run straight to the periphery
            nx, ny = x + step * math.cos(th), y + step * math.sin(th)
            segs.append((x, y, nx, ny, w, vein))
            x, y = nx, ny
            if math.hypot(x - dx0, y - dy0) > 2.2 * R or (x - fov_center[0]) ** 2 + (y - fov_center[1]) ** 2 > (0.98 * R) ** 2:
                break
            w *= rng.uniform(0.972, 0.992)
            if rng.random() < 0.14:
                side = 1 if rng.random() < 0.5 else -1
                stack.append((x, y, th + side * rng.uniform(0.4, 0.9), w * rng.uniform(0.5, 0.78),
                              curv * rng.uniform(0.2, 0.6) + rng.normal(0, 0.02), vein))
                w *= 0.92
    return segs


@dataclasses.dataclass(frozen=True)
class _Eye:
    """The geometry of one synthetic eye, in image pixels: the field of view (centre, radius), the optic
    disc, the macula, and which side the disc is on."""
    H: int
    W: int
    R: float            # field-of-view radius
    cx: float
    cy: float
    res: float          # image pixels per full-resolution IDRiD pixel
    side: int           # +1: disc on the right, -1: on the left
    rd: float           # disc radius
    disc_x: float
    disc_y: float
    mac_x: float
    mac_y: float
    temporal: float     # direction from the disc to the macula (radians)


def generate_fundus(seed: int, height: int, width: int, *, lesion_scale: float = 1.0,
                    lesion_density: float = 1.0, min_lesions: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic colour fundus photograph and its lesion masks.

    Args:
      seed: any int; the same (seed, height, width, options) always gives the same bytes.
      height, width: output size in pixels.
      lesion_scale: multiplies every lesion size (1.0 = realistic for the field-of-view size).
      lesion_density: multiplies the mean number of lesions of each type.
      min_lesions: at least this many lesions (MA dots, HE blotches, EX clusters, SE patches) of
        each type, placed inside the field of view, so every mask is non-empty when >= 1.

    Returns:
      image: uint8 [height, width, 3] RGB: circular field of view on a dark border, reddish-orange
        background with illumination falloff and a darker macula, optic disc and cup, a branching
        vessel tree, and lesions (EX bright yellow clusters, HE dark-red blotches and flames, SE pale
        fuzzy patches, MA tiny dark-red dots).
      masks: uint8 [height, width, 4] with values 0/1, channels EX, HE, SE, MA; lesions may overlap
        (multi-label) and all lie inside the field of view.
    """
    H, W = int(height), int(width)
    if H < 8 or W < 8:
        raise ValueError(f"generate_fundus: size {H}x{W} too small (need at least 8x8)")
    # One generator drawn from in a fixed order: the steps below must keep their order and their draws.
    rng = np.random.default_rng(int(seed) & 0xFFFFFFFFFFFFFFFF)
    cv = _Canvas(H, W)
    eye, r2, fov, fov_alpha = _field_of_view(rng, H, W)
    _paint_background(rng, cv, eye, r2)
    del r2
    _paint_disc(rng, cv, eye)
    _paint_vessels(rng, cv, eye)
    draw = _LesionDraws(rng, eye, lesion_scale=lesion_scale, lesion_density=lesion_density,
                        min_lesions=min_lesions)
    _paint_haemorrhages(draw, cv)
    _paint_hard_exudates(draw, cv)
    _paint_soft_exudates(draw, cv)
    _paint_microaneurysms(draw, cv)
    return _finish(rng, cv, fov, fov_alpha)


def _field_of_view(rng, H: int, W: int):
    """The eye's geometry, the squared normalised radius ``r2`` of every pixel, the field-of-view mask and
    its anti-aliased opacity."""
    # Field of view: a circle that, as in IDRiD, may be clipped at the top and bottom.
    R = 0.5 * min(W, 1.25 * H) * rng.uniform(0.92, 0.98)
    cx, cy = W / 2 + rng.uniform(-0.01, 0.01) * W, H / 2 + rng.uniform(-0.01, 0.01) * H
    res = R / _REF_RADIUS  # image pixels per full-resolution pixel
    yy = (np.arange(H, dtype=_F) - _F(cy))[:, None]
    xx = (np.arange(W, dtype=_F) - _F(cx))[None, :]
    r2 = (yy * yy + xx * xx) / _F(R * R)
    rr = np.sqrt(r2)
    fov = rr < 1
    fov_alpha = np.clip((1 - rr) * _F(R / max(1.0, 3 * res)) + _F(0.5), 0, 1)
    del rr

    side = 1 if rng.random() < 0.5 else -1  # left / right eye: disc on one side, macula central
    rd = R * rng.uniform(0.15, 0.18)
    disc_x, disc_y = cx + side * R * rng.uniform(0.36, 0.44), cy + R * rng.uniform(-0.06, 0.06)
    mac_x, mac_y = cx - side * R * rng.uniform(0.0, 0.06), cy + R * rng.uniform(-0.03, 0.03)
    temporal = math.atan2(mac_y - disc_y, mac_x - disc_x)
    eye = _Eye(H=H, W=W, R=R, cx=cx, cy=cy, res=res, side=side, rd=rd, disc_x=disc_x, disc_y=disc_y,
               mac_x=mac_x, mac_y=mac_y, temporal=temporal)
    return eye, r2, fov, fov_alpha


def _paint_background(rng, cv: _Canvas, eye: _Eye, r2: np.ndarray) -> None:
    """Background: vignetting, low- and mid-frequency mottling, darker macula (the canvas's colour planes)."""
    H, W, R = eye.H, eye.W, eye.R
    shade = 1 - _F(rng.uniform(0.25, 0.4)) * r2
    shade -= _F(rng.uniform(0.05, 0.15)) * r2 * r2
    shade += _upsample(rng.normal(0, 0.07, (6, 8)).astype(_F), H, W)
    shade += _upsample(rng.normal(0, 0.03, (max(H // 24, 12), max(W // 24, 16))).astype(_F), H, W)
    sig = R * rng.uniform(0.1, 0.14)
    b = cv.box(eye.mac_y, eye.mac_x, 3 * sig, 3 * sig)
    if b is not None:
        sl, dy, dx = b
        shade[sl] *= 1 - _F(rng.uniform(0.2, 0.35)) * np.exp(-(dy * dy + dx * dx) / _F(2 * sig * sig))
    red = rng.uniform(185, 228)
    base = (red, red * rng.uniform(0.38, 0.5), red * rng.uniform(0.1, 0.2))
    cv.ch = [shade * _F(v) for v in base]


def _paint_disc(rng, cv: _Canvas, eye: _Eye) -> None:
    """Optic disc (slightly taller than wide) with a pale cup."""
    disc_x, disc_y, rd = eye.disc_x, eye.disc_y, eye.rd
    blob = cv.blob(disc_y, disc_x, rd, elong=rng.uniform(0.88, 0.96), angle=0.0, harm=_harmonics(rng, 0.05), reach=1.3)
    if blob is not None:
        sl, rho = blob
        cv.paint(sl, _F(0.9) * _edge_alpha(rho, rd, 0.12 * rd), (rng.uniform(230, 252), rng.uniform(145, 185), rng.uniform(70, 110)))
    rc = rd * rng.uniform(0.35, 0.55)
    blob = cv.blob(disc_y, disc_x + eye.side * 0.15 * rd, rc, elong=rng.uniform(0.85, 1.0), reach=1.3)
    if blob is not None:
        sl, rho = blob
        cv.paint(sl, _F(0.6) * _edge_alpha(rho, rc, 0.3 * rc), (250, rng.uniform(200, 225), rng.uniform(140, 180)))


def _paint_vessels(rng, cv: _Canvas, eye: _Eye) -> None:
    """Vessels: two opacity maps (veins darker and wider than arteries), anti-aliased 1 px."""
    H, W = eye.H, eye.W
    vmaps = [np.zeros((H, W), _F), np.zeros((H, W), _F)]
    for x0, y0, x1, y1, w, vein in _vessel_tree(rng, (eye.disc_x, eye.disc_y), (eye.cx, eye.cy), eye.temporal, eye.R):
        hw = w / 2
        b = cv.box((y0 + y1) / 2, (x0 + x1) / 2, abs(y1 - y0) / 2 + hw + 1, abs(x1 - x0) / 2 + hw + 1)
        if b is None:
            continue
        sl, dy, dx = b
        ex, ey = _F(x1 - x0), _F(y1 - y0)
        px, py = dx + _F((x1 - x0) / 2), dy + _F((y1 - y0) / 2)  # relative to (x0, y0)
        t = np.clip((px * ex + py * ey) / (ex * ex + ey * ey + _F(1e-6)), 0, 1)
        qx, qy = px - t * ex, py - t * ey
        d = np.sqrt(qx * qx + qy * qy)
        # Thin vessels fade rather than vanish when narrower than a pixel.
        op = np.clip(_F(hw) - d + _F(0.5), 0, 1) * _F(min(1.0, w))
        m = vmaps[0 if vein else 1]
        np.maximum(m[sl], op, out=m[sl])
    k_vein, k_art = (0.42, 0.62, 0.5), (0.22, 0.4, 0.3)
    for c in range(3):
        m = 1 - vmaps[0] * _F(k_vein[c])
        m -= vmaps[1] * _F(k_art[c])
        cv.ch[c] *= m


class _LesionDraws:
    """The random draws the lesion painters share: where a lesion goes, how many of a type, how large."""

    def __init__(self, rng, eye: _Eye, *, lesion_scale: float, lesion_density: float, min_lesions: int):
        self.rng, self.eye = rng, eye
        self.lesion_scale, self.lesion_density, self.min_lesions = lesion_scale, lesion_density, min_lesions

    def place(self, center, spread, max_r=0.86, avoid_disc=True):
        """A point drawn around ``center`` inside ``max_r`` of the field of view (and off the disc)."""
        rng, e = self.rng, self.eye
        for _ in range(100):
            y, x = center[0] + rng.normal(0, spread), center[1] + rng.normal(0, spread)
            ok = (y - e.cy) ** 2 + (x - e.cx) ** 2 < (max_r * e.R) ** 2
            if ok and (not avoid_disc or (y - e.disc_y) ** 2 + (x - e.disc_x) ** 2 > (1.15 * e.rd) ** 2):
                return y, x
        return e.cy, e.cx

    def count(self, lam):
        return max(int(self.min_lesions), int(self.rng.poisson(lam * self.lesion_density)))

    def px_radius(self, median_fullres, sigma, lo, hi, min_px=1.0):
        r = float(np.clip(self.rng.lognormal(math.log(median_fullres), sigma), lo, hi)) * self.eye.res * self.lesion_scale
        return max(r, min_px)


def _paint_haemorrhages(draw: _LesionDraws, cv: _Canvas) -> None:
    """Haemorrhages: dot-blot (round, lobed) and flame-shaped (elongated), dark red, soft edged."""
    rng, eye, he_i = draw.rng, draw.eye, LESIONS.index("HE")
    for _ in range(draw.count(6.0)):
        y, x = draw.place((eye.mac_y, eye.mac_x), 0.42 * eye.R)
        flame = rng.random() < 0.35
        r0 = draw.px_radius(22 if not flame else 30, 0.5, 8, 130)
        elong = rng.uniform(2.0, 3.5) if flame else rng.uniform(1.0, 1.4)
        ang = rng.uniform(0, math.pi)
        k = np.array((0.5, 0.74, 0.68)) * rng.uniform(0.85, 1.12)
        for lobe in range(1 if flame else int(rng.integers(1, 4))):
            oy, ox = (0.0, 0.0) if lobe == 0 else rng.normal(0, 0.6 * r0, 2)
            blob = cv.blob(y + oy, x + ox, r0 * (1 if lobe == 0 else rng.uniform(0.5, 0.9)), elong=elong, angle=ang,
                           harm=_harmonics(rng, 0.3))
            if blob is None:
                continue
            sl, rho = blob
            cv.darken(sl, _F(0.95) * _edge_alpha(rho, r0, max(1.0, 0.15 * r0)), np.minimum(k, 0.95))
            cv.masks[he_i][sl] |= rho <= 1


def _paint_hard_exudates(draw: _LesionDraws, cv: _Canvas) -> None:
    """Hard exudates: clusters (scattered or circinate rings) of small sharp bright-yellow blobs."""
    rng, eye, ex_i = draw.rng, draw.eye, LESIONS.index("EX")
    R, cx, cy, res, lesion_scale = eye.R, eye.cx, eye.cy, eye.res, draw.lesion_scale
    for _ in range(draw.count(2.5)):
        ang0, dist = rng.uniform(0, 2 * math.pi), R * rng.uniform(0.08, 0.45)
        cy_e, cx_e = draw.place((eye.mac_y + dist * math.sin(ang0), eye.mac_x + dist * math.cos(ang0)), 0.02 * R)
        n = 1 + min(int(rng.geometric(0.07)), 60)
        ring = rng.random() < 0.35
        spread = rng.uniform(20, 120) * res * lesion_scale
        ring_r = rng.uniform(60, 250) * res * lesion_scale
        col = (rng.uniform(230, 255), rng.uniform(200, 235), rng.uniform(70, 130))
        for j in range(n):
            if ring:
                a = rng.uniform(0, 2 * math.pi)
                y, x = cy_e + ring_r * math.sin(a) + rng.normal(0, 0.15 * ring_r), cx_e + ring_r * math.cos(a) + rng.normal(0, 0.15 * ring_r)
            elif j == 0:
                y, x = cy_e, cx_e
            else:
                y, x = cy_e + rng.normal(0, spread), cx_e + rng.normal(0, spread)
            if (y - cy) ** 2 + (x - cx) ** 2 > (0.95 * R) ** 2:
                continue
            r0 = draw.px_radius(6, 0.55, 1.5, 45, min_px=0.8)
            blob = cv.blob(y, x, r0, elong=rng.uniform(1.0, 1.6), angle=rng.uniform(0, math.pi), harm=_harmonics(rng, 0.35))
            if blob is None:
                continue
            sl, rho = blob
            cv.paint(sl, _F(rng.uniform(0.82, 0.95)) * _edge_alpha(rho, r0, 0.8), col)
            cv.masks[ex_i][sl] |= rho <= 1


def _paint_soft_exudates(draw: _LesionDraws, cv: _Canvas) -> None:
    """Soft exudates (cotton-wool spots): pale, fuzzy patches near the disc along the arcades."""
    rng, eye, se_i = draw.rng, draw.eye, LESIONS.index("SE")
    for _ in range(draw.count(1.0)):
        a = eye.temporal + (1 if rng.random() < 0.5 else -1) * rng.uniform(0.5, 1.5)
        dist = eye.rd * rng.uniform(1.5, 3.2)
        y, x = draw.place((eye.disc_y + dist * math.sin(a), eye.disc_x + dist * math.cos(a)), 0.03 * eye.R)
        r0 = draw.px_radius(55, 0.35, 25, 130)
        blob = cv.blob(y, x, r0, elong=rng.uniform(1.0, 1.6), angle=rng.uniform(0, math.pi), harm=_harmonics(rng, 0.2), reach=1.7)
        if blob is None:
            continue
        sl, rho = blob
        t = np.clip((_F(1.6) - rho) / _F(1.2), 0, 1)
        alpha = _F(rng.uniform(0.55, 0.75)) * t * t * (3 - 2 * t)  # half opacity on the mask border
        cv.paint(sl, alpha, (rng.uniform(225, 245), rng.uniform(205, 228), rng.uniform(160, 192)))
        cv.masks[se_i][sl] |= rho <= 1


def _paint_microaneurysms(draw: _LesionDraws, cv: _Canvas) -> None:
    """Microaneurysms: tiny round dark-red dots, mostly in the posterior pole."""
    rng, eye, ma_i = draw.rng, draw.eye, LESIONS.index("MA")
    for _ in range(draw.count(14.0)):
        y, x = draw.place((eye.mac_y, eye.mac_x), 0.38 * eye.R)
        r0 = draw.px_radius(3.0, 0.35, 1.5, 6)
        blob = cv.blob(y, x, r0)
        if blob is None:
            continue
        sl, rho = blob
        k = np.minimum(np.array((0.45, 0.7, 0.62)) * rng.uniform(0.85, 1.15), 0.95)
        cv.darken(sl, _edge_alpha(rho, r0, 1.0), k)
        cv.masks[ma_i][sl] |= rho <= 1


def _finish(rng, cv: _Canvas, fov: np.ndarray, fov_alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sensor noise (shared by the channels), then the dark border outside the field of view; the image as
    uint8 and the masks inside the field of view."""
    H, W = cv.h, cv.w
    noise = rng.random((H, W), dtype=_F)
    noise -= _F(0.5)
    noise *= _F(rng.uniform(4, 8))
    border = rng.uniform(0, 6, 3)
    out = np.empty((H, W, 3), np.uint8)
    for c in range(3):
        p = cv.ch[c]
        p += noise
        p -= _F(border[c])
        p *= fov_alpha
        p += _F(border[c])
        np.clip(p, 0, 255, out=p)
        out[..., c] = np.rint(p)
    masks = np.empty((H, W, len(LESIONS)), np.uint8)
    for c in range(len(LESIONS)):
        masks[..., c] = cv.masks[c] & fov
    return out, masks


def example_seed(seed: int, split: str, index: int) -> int:
    """The generate_fundus seed of example ``index`` of ``split`` for a dataset-level ``seed``."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, _SPLIT_IDS.get(split, 99), int(index)])
    return int(ss.generate_state(1, dtype=np.uint64)[0])


@dataclasses.dataclass(eq=False)
class SyntheticFundusConfig(tfds.core.BuilderConfig):
    """Size, counts and seed of a synthetic_fundus variant (``name`` keys its folder in data_dir)."""

    height: int = 512
    width: int = 512
    num_train: int = 48
    num_test: int = 16
    seed: int = 0
    lesion_scale: float = 1.0


def synthetic_config(height: int, width: int, num_train: int, num_test: int, seed: int = 0,
                     lesion_scale: float = 1.0, name: str | None = None) -> SyntheticFundusConfig:
    """A config from arguments; its default name encodes them, so each variant is prepared once."""
    if name is None:
        name = f"h{height}_w{width}_n{num_train}_{num_test}_s{seed}_l{int(round(lesion_scale * 100))}"
    return SyntheticFundusConfig(
        name=name, height=height, width=width, num_train=num_train, num_test=num_test, seed=seed,
        lesion_scale=lesion_scale,
        description=f"{num_train} train / {num_test} test images of {height}x{width}, seed {seed}, lesion scale {lesion_scale}")


class SyntheticFundus(tfds.core.GeneratorBasedBuilder):
    """Procedural fundus images with EX/HE/SE/MA masks; needs no download. Splits: train, test."""

    name = "synthetic_fundus"
    code_path = _no_code_path
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    BUILDER_CONFIGS = [
        synthetic_config(512, 512, 48, 16, seed=0, name="default"),
        synthetic_config(64, 96, 4, 2, seed=0, name="tiny"),
    ]

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description="Synthetic fundus photographs with hard exudate (EX), haemorrhage (HE), soft exudate (SE) "
                        "and microaneurysm (MA) masks. image: uint8 [H,W,3] (PNG); masks: uint8 [H,W,4] 0/1 (PNG).",
            features=features(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        c = self.builder_config
        return {"train": self._generate_examples("train", c.num_train), "test": self._generate_examples("test", c.num_test)}

    def _generate_examples(self, split, n):
        c = self.builder_config
        for i in range(n):
            image, masks = generate_fundus(example_seed(c.seed, split, i), c.height, c.width, lesion_scale=c.lesion_scale)
            name = f"synthetic_{split}_{i:04d}"
            yield name, {"image": image, "masks": masks, "name": name}
