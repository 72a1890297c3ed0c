"""The phantom's anatomy and intensities: one patient as tissue ids, HU and a label.

Organs with close HU (liver, spleen, muscle), noise, partial-volume blur and varying anatomy;
a :class:`~privseg.data.scanners.Scanner` adds its calibration, noise, blur and geometry.
Everything is vectorised numpy on one [X, Y, Z] grid.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from privseg.data.scanners import Scanner

# Nominal cranio-caudal length (mm) the anatomy is laid out on; slice thickness only sets spacing.
BODY_LENGTH = 200.0

# Tissue ids, painted in this order (later ones overwrite earlier ones).
(
    AIR,
    TABLE,
    SKIN,
    FAT,
    MUSCLE,
    CAVITY,
    BOWEL_WALL,
    BOWEL_FLUID,
    GAS,
    KIDNEY,
    MEDULLA,
    LIVER,
    PORTAL,
    SPLEEN,
    STOMACH,
    PANCREAS,
    AORTA,
    IVC,
    BONE,
    MARROW,
    CSF,
    LESION,
) = range(22)


def synth_patient(
    rng: np.random.Generator, sc: Scanner, *, size: int, slices: int, organ: str = "liver"
) -> tuple[np.ndarray, np.ndarray]:
    """One patient as (HU int16, label uint8), both [X, Y, Z] in RAS (+x = patient's right)."""
    sp = sc.fov / size
    c = (np.arange(size, dtype=np.float32) - (size - 1) / 2) * sp
    c = c / np.float32(sc.body)  # a larger body: anatomy drawn on shrunken coordinates
    x, y = c[:, None, None], c[None, :, None]
    z = ((np.arange(slices, dtype=np.float32) + 0.5) / slices * BODY_LENGTH)[None, None, :]
    tissue = _anatomy(rng, x, y, z, organ)
    hu = _intensities(rng)[tissue]
    hu = gaussian_filter(hu, sigma=(sc.blur, sc.blur, 0.4), mode="nearest")
    noise = gaussian_filter(rng.standard_normal(hu.shape, dtype=np.float32), (0.7, 0.7, 0))
    hu = hu * sc.hu_scale + sc.hu_offset + noise * (sc.noise / max(float(noise.std()), 1e-6))
    target = _organ_mask(tissue, LIVER if organ == "liver" else PANCREAS)
    label = np.where(tissue == LESION, 2, target).astype(np.uint8)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), label


def _intensities(rng: np.random.Generator) -> np.ndarray:
    """HU per tissue for one patient; contrast phase ``c`` brightens enhancing organs together."""
    c = rng.uniform(0.0, 1.0)
    liver = rng.uniform(50.0, 65.0) + 35.0 * c
    lut = np.zeros(LESION + 1, dtype=np.float32)
    lut[[AIR, GAS]] = -1000.0
    lut[TABLE] = rng.uniform(-250.0, -150.0)
    lut[SKIN] = rng.uniform(20.0, 40.0)
    lut[FAT] = rng.uniform(-115.0, -90.0)
    lut[CAVITY] = lut[FAT] + rng.uniform(0.0, 20.0)
    lut[MUSCLE] = rng.uniform(45.0, 60.0)
    lut[BOWEL_WALL] = rng.uniform(35.0, 60.0) + 30.0 * c
    lut[BOWEL_FLUID] = rng.uniform(5.0, 30.0)
    lut[KIDNEY] = 120.0 + 90.0 * c
    lut[MEDULLA] = lut[KIDNEY] - rng.uniform(30.0, 70.0)
    lut[LIVER] = liver
    lut[PORTAL] = liver + rng.uniform(25.0, 60.0) * c + 10.0
    lut[SPLEEN] = liver + rng.uniform(-5.0, 15.0)
    lut[STOMACH] = rng.uniform(10.0, 35.0)
    lut[PANCREAS] = rng.uniform(35.0, 50.0) + 40.0 * c
    lut[AORTA] = 130.0 + 170.0 * c
    lut[IVC] = 90.0 + 90.0 * c
    lut[BONE] = rng.uniform(600.0, 1000.0)
    lut[MARROW] = rng.uniform(180.0, 300.0)
    lut[CSF] = rng.uniform(5.0, 20.0)
    lut[LESION] = liver - rng.uniform(25.0, 60.0)
    return lut


def _ellipsoid(x, y, z, centre, semi) -> np.ndarray:
    """Normalised ellipsoid radius (< 1 inside); an infinite z semi-axis gives a cylinder."""
    (cx, cy, cz), (ax, ay, az) = centre, semi
    r = ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2
    return r + ((z - cz) / az) ** 2 if np.isfinite(az) else r + 0 * z


def _smooth_field(rng: np.random.Generator, x, y, z, amplitude: float) -> np.ndarray:
    """A smooth random deformation: a few low-frequency plane waves (wavelength 60-160 mm)."""
    field = 0.0
    for _ in range(5):
        k = rng.normal(size=3)
        kx, ky, kz = (
            float(v) for v in k * 2 * np.pi / rng.uniform(60.0, 160.0) / np.linalg.norm(k)
        )
        phase = (kx * x + ky * y) + (kz * z + rng.uniform(0, 2 * np.pi))  # float32, 2D + 1D
        field = field + rng.uniform(0.3, 1.0) * amplitude * np.cos(phase)
    return field


def _anatomy(rng: np.random.Generator, x, y, z, organ: str) -> np.ndarray:
    """Tissue ids [X, Y, Z]: body wall layers, retroperitoneum, viscera, then the target organ."""
    shape = np.broadcast_shapes(x.shape, y.shape, z.shape)
    t = np.full(shape, AIR, dtype=np.uint8)
    u = z / BODY_LENGTH
    a = rng.uniform(125.0, 160.0) * (1 + 0.06 * (u - 0.5))
    b_ant = rng.uniform(95.0, 120.0)
    b = np.where(y >= 0, b_ant, 0.85 * b_ant)
    r = np.hypot(x, y)
    theta = np.arctan2(y, x)
    wobble = 1 + 0.04 * np.cos(2 * theta + rng.uniform(0, 6.3)) + 0.03 * np.cos(3 * theta + 1.0)
    rho = np.sqrt((x / a) ** 2 + (y / b) ** 2) / wobble
    depth = r * (1 / np.maximum(rho, 1e-3) - 1)  # mm from the skin, along the ray from the centre
    fat = rng.uniform(8.0, 35.0) * (1 + 0.4 * np.sin(theta))
    wall = rng.uniform(6.0, 14.0)
    inner = 2 + fat + wall

    table = (np.abs(x) < 0.8 * a) & (y < -0.85 * b_ant - 12) & (y > -0.85 * b_ant - 20)
    t[np.broadcast_to(table, shape)] = TABLE
    body = rho < 1
    t[body] = SKIN
    t[body & (depth > 2)] = FAT
    t[body & (depth > 2 + fat)] = MUSCLE
    cavity = body & (depth > inner)
    t[cavity] = CAVITY
    ribs = body & (u > 0.45) & (depth > inner - wall * 0.8) & (depth < inner - wall * 0.2)
    t[ribs & (np.cos(9 * theta + 40 * u) > 0.55)] = BONE

    ys = -0.85 * b_ant * 0.6  # centre of the vertebral body
    rv = rng.uniform(15.0, 20.0)
    inf = np.inf
    _bowel(rng, t, x, y, z, cavity, a, b_ant)
    for side, zc in ((1, 0.27), (-1, 0.33)):  # the right kidney sits lower
        centre = (side * (rv + 45), ys + 8, zc * BODY_LENGTH)
        k = _ellipsoid(x, y, z, centre, (28, 22, 0.22 * BODY_LENGTH * rng.uniform(0.85, 1.1)))
        t[k < 1] = KIDNEY
        t[k < 0.45] = MEDULLA
    liver = _liver(rng, t, x, y, z, cavity, a, b_ant)
    spleen = _ellipsoid(
        x,
        y,
        z,
        (-0.55 * a, -0.2 * b_ant, 0.7 * BODY_LENGTH),
        (0.2 * a, 0.32 * b_ant, 0.17 * BODY_LENGTH),
    )
    t[(spleen + _smooth_field(rng, x, y, z, 0.1) < 1) & cavity & ~liver] = SPLEEN
    stomach = _ellipsoid(
        x,
        y,
        z,
        (-0.25 * a, 0.35 * b_ant, 0.75 * BODY_LENGTH),
        (0.25 * a, 0.22 * b_ant, 0.14 * BODY_LENGTH),
    )
    t[(stomach < 1) & cavity & ~liver] = STOMACH
    t[(stomach < 1) & cavity & ~liver & (y > 0.42 * b_ant)] = GAS
    if organ == "pancreas":
        _pancreas(rng, t, x, y, z, a, ys, rv)
    t[_ellipsoid(x, y, z, (-18, ys + rv + 10, 0), (11, 11, inf)) < 1] = AORTA
    t[(_ellipsoid(x, y, z, (24, ys + rv + 8, 0), (13, 9, inf)) < 1) & (u < 0.85)] = IVC
    _spine(rng, t, x, y, z, ys, rv)
    if organ == "liver":
        _lesions(rng, t, x, y, z, _organ_mask(t, LIVER), count=rng.poisson(1.3), radius=18.0)
    else:  # one small tumour in about half of the pancreases
        _lesions(rng, t, x, y, z, _organ_mask(t, PANCREAS), count=rng.poisson(0.6), radius=9.0)
    return t


def _organ_mask(t: np.ndarray, organ: int) -> np.ndarray:
    return (t == organ) | ((t == PORTAL) & (organ == LIVER))


def _bowel(rng, t, x, y, z, cavity, a, b) -> None:
    """Gas- and fluid-filled loops with walls in the anterior and lower abdomen."""
    for _ in range(int(rng.integers(8, 16))):
        centre = (
            rng.uniform(-0.6, 0.6) * a,
            rng.uniform(-0.1, 0.7) * b,
            rng.uniform(0.0, 0.65) * BODY_LENGTH,
        )
        radius = rng.uniform(8.0, 18.0)
        loop = _ellipsoid(x, y, z, centre, (radius, radius, radius * rng.uniform(1.0, 2.5)))
        t[(loop < 1) & cavity] = BOWEL_WALL
        t[(loop < 0.65) & cavity] = GAS if rng.uniform() < 0.4 else BOWEL_FLUID


def _liver(rng, t, x, y, z, cavity, a, b) -> np.ndarray:
    """Right lobe plus left lobe, deformed per patient, with portal veins inside."""
    zc = rng.uniform(0.6, 0.7) * BODY_LENGTH
    hz = rng.uniform(0.22, 0.3) * BODY_LENGTH
    right = _ellipsoid(
        x,
        y,
        z,
        (0.42 * a, 0.0, zc),
        (0.42 * a * rng.uniform(0.9, 1.1), 0.62 * b * rng.uniform(0.9, 1.1), hz),
    )
    left = _ellipsoid(
        x,
        y,
        z,
        (-0.05 * a, 0.4 * b, zc + 0.1 * BODY_LENGTH),
        (0.38 * a * rng.uniform(0.8, 1.2), 0.28 * b, 0.6 * hz),
    )
    shape = np.minimum(right, left) + _smooth_field(rng, x, y, z, 0.12)
    liver = (shape < 1) & cavity & (t != KIDNEY) & (t != MEDULLA)
    t[liver] = LIVER
    for _ in range(3):
        vx, vy = rng.uniform(0.2, 0.6) * a, rng.uniform(-0.3, 0.3) * b
        vessel = _ellipsoid(x, y, z, (vx, vy, 0), (rng.uniform(3, 6), rng.uniform(3, 6), np.inf))
        t[(vessel < 1) & liver] = PORTAL
    return liver


def _pancreas(rng, t, x, y, z, a, ys, rv) -> None:
    """An elongated low-contrast organ from the splenic hilum (tail) to the duodenum (head)."""
    s = x / a
    yc = ys + rv + 28 + 20 * (s + 0.4) ** 2
    zc = (0.45 - 0.12 * s) * BODY_LENGTH + rng.uniform(-10, 10)
    radius = np.where(s > 0.05, 13.0, 8.0) * rng.uniform(0.85, 1.15)
    shape = ((y - yc) / radius) ** 2 + ((z - zc) / (1.4 * radius)) ** 2
    shape = shape + _smooth_field(rng, x, y, z, 0.25)
    t[(shape < 1) & (s > -0.5) & (s < 0.25) & (t == CAVITY)] = PANCREAS


def _spine(rng, t, x, y, z, ys, rv) -> None:
    """Vertebral body (cortex, marrow), canal, posterior elements, psoas and paraspinal muscles."""
    inf = np.inf
    u = z / BODY_LENGTH
    for side in (1, -1):
        psoas = 8 + 12 * (1 - u)
        t[_ellipsoid(x, y, z, (side * (rv + 12), ys + 5, 0), (1, 1, inf)) < psoas**2] = MUSCLE
        t[_ellipsoid(x, y, z, (side * 30, ys - rv - 15, 0), (22, 18, inf)) < 1] = MUSCLE
    body = _ellipsoid(x, y, z, (0, ys, 0), (rv, rv, inf))
    t[body < 1] = BONE
    t[body < ((rv - 2.5) / rv) ** 2] = MARROW
    canal = _ellipsoid(x, y, z, (0, ys - rv - 9, 0), (1, 1, inf))
    t[(canal < 14**2) & (canal >= 8**2)] = BONE
    t[canal < 8**2] = CSF
    process = (np.abs(x) < 4) & (y < ys - rv - 20) & (y > ys - rv - 36)
    t[np.broadcast_to(process, t.shape)] = BONE


def _lesions(rng, t, x, y, z, organ: np.ndarray, count: int, radius: float) -> None:
    """Hypodense lesions centred on random organ voxels, kept inside the organ."""
    inside = np.flatnonzero(organ)
    shape = np.broadcast_shapes(x.shape, y.shape, z.shape)
    for _ in range(min(count, len(inside))):
        i, j, k = np.unravel_index(rng.choice(inside), shape)
        centre = (x.flat[i], y.flat[j], z.flat[k])
        r = rng.uniform(4.0, radius)
        lesion = _ellipsoid(x, y, z, centre, (r, r * rng.uniform(0.7, 1.3), r))
        t[(lesion < 1) & organ] = LESION
