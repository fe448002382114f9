"""Procedural abdominal CT phantoms with exact per-class truth, for demos, tests and training experiments.

:func:`generate_phantom` draws one synthetic CT in Hounsfield units: a body outline with fat and muscle,
spine and pelvic bones, and every organ and vessel of the taxonomy at a plausible position, shape and
intensity, plus (randomly) tumours and cysts inside their organs. The pose, the size of the patient and of
each organ, the contrast phase, the noise level and the voxel grid's orientation vary with the seed. Shapes
are ellipsoids and tubes with smooth random deformations: no anatomy atlas, numpy/scipy only, and fast
(a 96^3 volume takes a fraction of a second).

The truth follows the library's class conventions: one mask per class (they overlap where the taxonomy
says so): every organ channel includes its lesions (the liver includes liver tumours, a kidney includes
its tumour and cyst) and the liver includes the hepatic vessels running through it.

:func:`phantom_raw_labels` turns a phantom into the label map of a *partially labelled dataset* (see
:data:`PHANTOM_DATASETS`): only that dataset's structures are labelled, with the dataset's own values and
merges (one "kidney" label for both sides, ...), and everything else is left as background exactly like in
real public datasets. The training package harmonises such label maps back to the taxonomy.

Coordinates: the anatomy is defined in a patient frame in millimetres (x towards the patient's right,
y anterior, z superior: RAS), posed randomly, and sampled on a voxel grid whose IJK->RAS affine is
returned with the image (default orientation LPS, as a DICOM-derived NIfTI would be).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .taxonomy import KIND_PRIORITY, Taxonomy, get_taxonomy

__all__ = [
    "PHANTOM_DATASETS",
    "Phantom",
    "generate_phantom",
    "phantom_affine",
    "phantom_raw_labels",
    "phantom_dataset_spec",
]

_AXIS_CODES = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}

# The order in which lesions are drawn (kidney lesions first: they may bulge out of the kidney). Where each
# may lie is the taxonomy's: its parent organs.
_LESION_DRAW_ORDER = (26, 32, 27, 28, 29, 30, 31)
_LIVER, _HEPATIC_VESSEL = 6, 15


@dataclass
class Phantom:
    """A synthetic CT with its truth.

    Attributes:
        image: HU values (int16), IJK order.
        affine: 4x4 IJK->RAS affine.
        masks: ``{class index: bool array}`` for every class of the taxonomy (empty when absent); organ
            masks include their lesions.
        extra: masks of unlabelled structures that some datasets label (``"bone"``, ``"heart"``).
        seed: the seed the phantom was drawn from (None for a caller-supplied generator).
        parameters: the random choices (pose, scale, contrast phase, noise, lesions), for reports.
    """

    image: np.ndarray
    affine: np.ndarray
    masks: dict[int, np.ndarray]
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    seed: int | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.image.shape)

    @property
    def present(self) -> tuple[int, ...]:
        """Classes with at least one voxel."""
        return tuple(i for i, m in sorted(self.masks.items()) if m.any())

    @property
    def volume(self):
        """The image as a library :class:`~UniversalSegLib.io.Volume`."""
        from .io.volume import Volume

        return Volume(array=self.image, affine=self.affine, source=f"phantom(seed={self.seed})", format="phantom")

    def label_map(self, classes: Sequence[int] | None = None) -> np.ndarray:
        """One label per voxel (class index), with the library's overlap rule (lesion > vessel > organ)."""
        from .io.masks import label_map_from_masks

        chosen = self.masks if classes is None else {int(i): self.masks[int(i)] for i in classes}
        return label_map_from_masks(self.shape, chosen, {info.index: info for info in get_taxonomy()})


# ------------------------------------------------------------------------------------------ the voxel grid
def phantom_affine(shape: Sequence[int], spacing: Sequence[float], orientation: str = "LPS",
                   center: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """IJK->RAS affine of a grid whose voxel axes point along ``orientation`` (e.g. "LPS", "RAS", "SRA")
    and whose centre lies at ``center`` (RAS mm)."""
    orientation = orientation.upper()
    axes = [_AXIS_CODES.get(code) for code in orientation]
    if len(orientation) != 3 or None in axes or len({a[0] for a in axes}) != 3:
        raise ValueError(f"orientation {orientation!r} must be three letters naming each world axis once, e.g. 'LPS' or 'RAS'.")
    affine = np.eye(4)
    for column, ((world_axis, sign), size) in enumerate(zip(axes, spacing)):
        affine[:3, column] = 0.0
        affine[world_axis, column] = sign * float(size)
    middle = (np.asarray(shape, dtype=float) - 1) / 2
    affine[:3, 3] = np.asarray(center, dtype=float) - affine[:3, :3] @ middle
    return affine


class _Grid:
    """Maps boxes of voxels to patient-frame coordinates (mm) for shape evaluation."""

    def __init__(self, shape, affine, patient_to_world):
        self.shape = tuple(shape)
        self.ijk_to_patient = np.linalg.inv(patient_to_world) @ affine
        self.patient_to_ijk = np.linalg.inv(self.ijk_to_patient)

    def box(self, low, high):
        """Voxel slices covering the patient-frame box [low, high] (None when outside the grid)."""
        corners = np.array([[x, y, z, 1.0] for x in (low[0], high[0]) for y in (low[1], high[1]) for z in (low[2], high[2])])
        ijk = (self.patient_to_ijk @ corners.T)[:3]
        start = np.maximum(np.floor(ijk.min(axis=1)).astype(int), 0)
        stop = np.minimum(np.ceil(ijk.max(axis=1)).astype(int) + 1, self.shape)
        if np.any(stop <= start):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(start, stop))

    def coordinates(self, box):
        """Patient-frame x, y, z (float32 arrays broadcast to the box shape)."""
        i, j, k = (np.arange(s.start, s.stop, dtype=np.float32) for s in box)
        i, j, k = i[:, None, None], j[None, :, None], k[None, None, :]
        m = self.ijk_to_patient.astype(np.float32)
        return tuple(m[r, 0] * i + m[r, 1] * j + m[r, 2] * k + m[r, 3] for r in range(3))


def _rotation(rx: float = 0.0, ry: float = 0.0, rz: float = 0.0) -> np.ndarray:
    """Rotation matrix from angles in degrees about x, then y, then z."""
    ax, ay, az = np.deg2rad([rx, ry, rz])
    rot_x = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rot_y = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rot_z = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rot_z @ rot_y @ rot_x


# ---------------------------------------------------------------------------------------- shape primitives
class _Shapes:
    """Evaluates smooth random shapes on the grid; every shape returns (box, bool mask in the box)."""

    def __init__(self, grid: _Grid, rng: np.random.Generator):
        self.grid = grid
        self.rng = rng

    def _wobble(self, u, amplitude: float, count: int = 3):
        """A smooth random field around 0 (sum of a few low-frequency sinusoids), for organic outlines."""
        if amplitude <= 0:
            return 0.0
        total = 0.0
        for _ in range(count):
            direction = self.rng.normal(size=3)
            direction *= self.rng.uniform(1.0, 3.0) / np.linalg.norm(direction)
            a, b, c = (float(v) for v in direction)  # Python floats keep float32 arrays float32
            total = total + np.sin(a * u[0] + b * u[1] + c * u[2] + float(self.rng.uniform(0, 2 * np.pi)))
        return (amplitude / np.sqrt(count)) * total

    def ellipsoid(self, center, semi_axes, rotation=None, wobble: float = 0.0):
        center = np.asarray(center, dtype=float)
        semi = np.asarray(semi_axes, dtype=float)
        r = np.eye(3) if rotation is None else np.asarray(rotation, dtype=float)
        # Exact axis-aligned half-extent of the rotated ellipsoid, enlarged for the wobble.
        reach = np.sqrt(((r * semi) ** 2).sum(axis=1)) * (1.0 + 2 * wobble) + 1.0
        box = self.grid.box(center - reach, center + reach)
        if box is None:
            return None, None
        x, y, z = self.grid.coordinates(box)
        d = (x - float(center[0]), y - float(center[1]), z - float(center[2]))
        # u = R^T d / semi, computed with Python floats so that the arrays stay float32.
        u = [(float(r[0, a]) * d[0] + float(r[1, a]) * d[1] + float(r[2, a]) * d[2]) * float(1.0 / semi[a]) for a in range(3)]
        radius2 = u[0] * u[0] + u[1] * u[1] + u[2] * u[2]
        if wobble:
            radius2 = radius2 - 2.0 * self._wobble(u, wobble)  # (1+w)^2 ~ 1+2w for small w
        return box, radius2 < 1.0

    def tube(self, points, radii, wobble: float = 0.0):
        """Voxels within radius of a polyline (radius interpolated linearly along each segment)."""
        points = np.asarray(points, dtype=float)
        radii = np.broadcast_to(np.asarray(radii, dtype=float), (len(points),))
        grow = 1.0 + 2 * wobble
        reach = radii.max() * grow + 1.0
        box = self.grid.box(points.min(axis=0) - reach, points.max(axis=0) + reach)
        if box is None:
            return None, None
        size = tuple(s.stop - s.start for s in box)
        best = np.full(size, np.inf, dtype=np.float32)  # distance / radius, minimised over segments
        for (a, b, ra, rb) in zip(points[:-1], points[1:], radii[:-1], radii[1:]):
            # Each segment is evaluated in its own box only.
            r = max(ra, rb) * grow + 1.0
            sub = self.grid.box(np.minimum(a, b) - r, np.maximum(a, b) + r)
            if sub is None:
                continue
            sub = tuple(slice(max(s.start, o.start), min(s.stop, o.stop)) for s, o in zip(sub, box))
            if any(s.stop <= s.start for s in sub):
                continue
            x, y, z = self.grid.coordinates(sub)
            ab = b - a
            length2 = float(ab @ ab) or 1e-9
            a0, a1, a2 = (float(v) for v in a)
            b0, b1, b2 = (float(v) for v in ab)
            dx, dy, dz = x - a0, y - a1, z - a2
            t = np.clip((dx * b0 + dy * b1 + dz * b2) * (1.0 / length2), 0.0, 1.0)
            dist = np.sqrt((dx - t * b0) ** 2 + (dy - t * b1) ** 2 + (dz - t * b2) ** 2)
            ratio = dist / (float(ra) + t * float(rb - ra))
            local = tuple(slice(s.start - o.start, s.stop - o.start) for s, o in zip(sub, box))
            np.minimum(best[local], ratio, out=best[local])
        if wobble:
            x, y, z = self.grid.coordinates(box)
            scale = 1.0 / (max(float(radii.max()), 1.0) * 2.0)
            best = best - self._wobble((x * scale, y * scale, z * scale), wobble)
        return box, best < 1.0


# --------------------------------------------------------------------------------------------- the anatomy
@dataclass
class _Canvas:
    """The image under construction: HU values and an exclusive owner label per voxel."""

    hu: np.ndarray
    owner: np.ndarray  # 0 = none, class index for taxonomy structures, negative codes for the rest

    def paint(self, box, mask, label: int, hu, where=None):
        """Give ``mask`` voxels (inside ``where``, a full-size mask, when given) to ``label`` with ``hu``."""
        if box is None:
            return
        if where is not None:
            mask = mask & where[box]
        self.owner[box][mask] = label
        region = self.hu[box]
        region[mask] = hu if np.isscalar(hu) else hu[mask]


# Codes of unlabelled structures in the owner map.
_FAT, _MUSCLE, _BONE, _HEART, _MARROW, _CSF, _ILIAC = -1, -2, -3, -4, -5, -6, -7


def generate_phantom(
    seed: int | np.random.Generator | None = None,
    shape: Sequence[int] = (96, 96, 96),
    spacing: Sequence[float] = (3.2, 3.2, 3.2),
    orientation: str = "LPS",
    lesion_probability: float = 0.5,
    noise_hu: float | None = None,
) -> Phantom:
    """Draw one synthetic abdominal CT (HU, int16) with per-class truth masks.

    Args:
        seed: an int (reproducible), a numpy Generator, or None (fresh randomness).
        shape: voxels along i, j, k.
        spacing: voxel size in mm; the default 96 x 3.2 mm field of view spans the lung bases to the
            femoral heads.
        orientation: where the voxel axes point ("LPS" like a DICOM-derived NIfTI, "RAS", or any other
            permutation/flip such as "SRA"), or "random".
        lesion_probability: chance of each lesion type (liver tumour, kidney tumour, kidney cyst, pancreas
            tumour, hepatic-vessel tumour, lung tumour, colon tumour) appearing.
        noise_hu: standard deviation of the image noise (random 6..22 HU when None).
    """
    from scipy import ndimage

    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    seed_value = seed if isinstance(seed, (int, np.integer)) else None
    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, dtype=float), (3,)))
    if orientation == "random":
        letters = [rng.choice(pair) for pair in (("R", "L"), ("A", "P"), ("S", "I"))]
        orientation = "".join(letters[a] for a in rng.permutation(3))
    affine = phantom_affine(shape, spacing, orientation, center=rng.uniform(-40, 40, size=3))

    # Pose of the patient in the scanner: small rotations, shift, body habitus.
    pose = {
        "rotation_deg": [float(v) for v in rng.uniform([-5, -5, -10], [5, 5, 10])],
        "shift_mm": [float(v) for v in rng.uniform([-12, -12, -15], [12, 12, 15])],
        "scale": [float(v) for v in rng.uniform([0.88, 0.88, 0.92], [1.08, 1.08, 1.06])],
    }
    patient_to_world = np.eye(4)
    patient_to_world[:3, :3] = _rotation(*pose["rotation_deg"]) @ np.diag(pose["scale"])
    patient_to_world[:3, 3] = affine[:3, :3] @ ((np.asarray(shape) - 1) / 2) + affine[:3, 3] + pose["shift_mm"]
    grid = _Grid(shape, affine, patient_to_world)
    shapes = _Shapes(grid, rng)
    canvas = _Canvas(hu=np.full(shape, -1000.0, dtype=np.float32), owner=np.zeros(shape, dtype=np.int8))

    phase = float(rng.uniform(0.0, 1.0))  # 0 = non-contrast, 1 = portal venous
    male = bool(rng.random() < 0.5)

    def jitter(point, amount=6.0):
        return np.asarray(point, dtype=float) + rng.uniform(-amount, amount, size=3)

    def size(semi, low=0.88, high=1.12):
        return np.asarray(semi, dtype=float) * rng.uniform(low, high)

    def hu(mean, spread=8.0):
        return float(mean + rng.uniform(-spread, spread))

    # Body: skin/fat, muscle wall, visceral fat.
    body_semi = size([138, 100, 400], 0.92, 1.06)
    box, body = shapes.ellipsoid([0, 0, 0], body_semi)
    canvas.paint(box, body, _FAT, hu(-100, 10))
    box, wall = shapes.ellipsoid([0, -3, 0], body_semi - [14, 12, 0])
    canvas.paint(box, wall, _MUSCLE, hu(48))
    box, cavity = shapes.ellipsoid([0, 0, 0], body_semi - [24, 22, 0])
    canvas.paint(box, cavity, _FAT, hu(-95, 10))
    inside = canvas.owner != 0  # organs never leave the body

    # Lungs and heart at the top (x > 0 is the patient's right).
    lung_hu = hu(-840, 30)
    for index, x in ((16, 72), (17, -72)):
        box, lung = shapes.ellipsoid(jitter([x, -12, 168], 8), size([58, 78, 82]), wobble=0.04)
        canvas.paint(box, lung, index, lung_hu, where=inside)
    box, heart = shapes.ellipsoid(jitter([-18, 28, 158]), size([68, 52, 46]), _rotation(rz=20), wobble=0.03)
    canvas.paint(box, heart, _HEART, hu(40 + 80 * phase))

    # Muscles of the back and the psoas.
    for side in (1, -1):
        box, back = shapes.ellipsoid([side * 36, -72, 0], [24, 18, 400], wobble=0.03)
        canvas.paint(box, back, _MUSCLE, hu(50), where=inside)
        box, psoas = shapes.tube([[side * 24, -45, 50], [side * 38, -35, -40], [side * 50, -15, -110]], [8, 18, 20])
        canvas.paint(box, psoas, _MUSCLE, hu(48), where=inside)

    # Small bowel loops: a band of a smooth random field inside the lower abdomen.
    box, region = shapes.ellipsoid(jitter([0, 25, -35], 8), size([82, 55, 60]), wobble=0.05)
    if box is not None:
        x, y, z = grid.coordinates(box)
        field_ = sum(np.sin(rng.uniform(0.06, 0.11) * (np.cos(a) * x + np.sin(a) * y) + rng.uniform(0.04, 0.08) * z
                            + rng.uniform(0, 2 * np.pi)) for a in rng.uniform(0, np.pi, size=3))
        loops = region & (np.abs(field_) < 0.75)
        canvas.paint(box, loops, 19, hu(30 + 40 * phase, 10), where=inside)
        gas = loops & (np.sin(0.3 * x + 0.2 * y + rng.uniform(0, 6)) > 0.93)
        canvas.paint(box, gas, 19, -700.0, where=inside)

    # Liver (right upper quadrant, with a left lobe) and gallbladder.
    liver_hu = hu(58 + 55 * phase)
    box, liver = shapes.ellipsoid(jitter([52, 5, 62]), size([82, 72, 58]), _rotation(rz=-15), wobble=0.06)
    canvas.paint(box, liver, 6, liver_hu, where=inside)
    box, lobe = shapes.ellipsoid(jitter([-12, 32, 78]), size([52, 36, 28]), _rotation(rz=10), wobble=0.06)
    canvas.paint(box, lobe, 6, liver_hu, where=inside)
    box, gallbladder = shapes.ellipsoid(jitter([50, 42, 12]), size([14, 15, 27], 0.7, 1.2), _rotation(rx=25), wobble=0.04)
    canvas.paint(box, gallbladder, 4, hu(12), where=inside)

    # Spleen, stomach, esophagus.
    box, spleen = shapes.ellipsoid(jitter([-84, -34, 70]), size([24, 42, 46], 0.8, 1.2), _rotation(rz=35), wobble=0.05)
    canvas.paint(box, spleen, 1, hu(50 + 70 * phase), where=inside)
    stomach_center = jitter([-42, 24, 72])
    box, stomach = shapes.ellipsoid(stomach_center, size([44, 36, 48], 0.8, 1.15), _rotation(rz=-30, rx=15), wobble=0.06)
    canvas.paint(box, stomach, 7, hu(25, 10), where=inside)
    box, antrum = shapes.tube([stomach_center + [10, 5, -25], jitter([8, 38, 42], 4)], [20, 12], wobble=0.05)
    canvas.paint(box, antrum, 7, hu(30, 10), where=inside)
    box, gastric_gas = shapes.ellipsoid(stomach_center + [0, 14, 28], size([26, 16, 14], 0.5, 1.2))
    canvas.paint(box, gastric_gas, 7, -850.0, where=canvas.owner == 7)
    box, esophagus = shapes.tube([jitter([-6, -42, 150], 4), jitter([-10, -36, 112], 4), stomach_center + [8, -8, 30]], 8.5)
    canvas.paint(box, esophagus, 5, hu(40), where=inside)

    # Colon frame, rectum, bladder, prostate.
    colon = [jitter(p, 8) for p in ([78, 12, -72], [84, 6, 30], [66, 34, 46], [0, 58, 34], [-72, 26, 60],
                                     [-84, 0, -30], [-55, 22, -82], [-12, 4, -96], [0, -38, -104])]
    box, colon_mask = shapes.tube(colon, size([21], 0.8, 1.15)[0], wobble=0.08)
    canvas.paint(box, colon_mask, 18, hu(15, 15), where=inside)
    if box is not None:
        x, y, z = grid.coordinates(box)
        pockets = colon_mask & (np.sin(0.12 * x + 0.09 * z + rng.uniform(0, 6)) * np.sin(0.1 * y - 0.07 * z) > 0.35)
        canvas.paint(box, pockets, 18, -800.0, where=inside)
    box, rectum = shapes.tube([colon[-1], jitter([0, -52, -150], 4)], [17, 15], wobble=0.05)
    canvas.paint(box, rectum, 20, hu(20, 10), where=inside)
    box, bladder = shapes.ellipsoid(jitter([0, 34, -104]), size([42, 32, 30], 0.6, 1.2), wobble=0.04)
    canvas.paint(box, bladder, 21, hu(8, 6), where=inside)
    if male:
        box, prostate = shapes.ellipsoid(jitter([0, 8, -134], 4), size([18, 14, 15]), wobble=0.04)
        canvas.paint(box, prostate, 22, hu(40), where=inside)

    # Pancreas and duodenum around it.
    pancreas = [jitter(p, 5) for p in ([24, 10, 24], [4, 16, 34], [-30, 2, 44], [-66, -24, 56])]
    box, pancreas_mask = shapes.tube(pancreas, size([15, 11, 11, 9], 0.85, 1.15), wobble=0.08)
    canvas.paint(box, pancreas_mask, 11, hu(40 + 60 * phase), where=inside)
    duodenum = [jitter([8, 38, 42], 3), [40, 26, 38], [46, 10, 16], [36, 4, -6], [2, 2, -8], [-22, 6, 8]]
    box, duodenum_mask = shapes.tube([jitter(p, 4) for p in duodenum], size([11], 0.85, 1.15)[0], wobble=0.06)
    canvas.paint(box, duodenum_mask, 14, hu(30, 10), where=inside & (canvas.owner != 11))

    # Kidneys (left slightly higher) and adrenal glands above them.
    kidney_hu = hu(35 + 150 * phase, 15)
    for index, x, z, turn in ((2, 68, 4, 20), (3, -68, 16, -20)):
        box, kidney = shapes.ellipsoid(jitter([x, -44, z]), size([25, 21, 50]), _rotation(ry=np.sign(x) * 12, rz=turn), wobble=0.04)
        canvas.paint(box, kidney, index, kidney_hu, where=inside)
    for index, x, z in ((12, 48, 64), (13, -50, 70)):
        box, adrenal = shapes.ellipsoid(jitter([x, -34, z], 4), size([6, 13, 17]), _rotation(rz=np.sign(x) * 30), wobble=0.05)
        canvas.paint(box, adrenal, index, hu(30 + 30 * phase), where=inside)

    # Vessels: aorta with iliac arteries, IVC, portal/splenic vein, celiac trunk, hepatic vessels.
    arterial = hu(42 + 190 * phase, 15)
    venous = hu(42 + 140 * phase, 15)
    aorta_top, aorta_bottom = jitter([-16, -30, 170], 3), jitter([-14, -26, -70], 3)
    box, aorta = shapes.tube([aorta_top, aorta_bottom], size([12], 0.85, 1.2)[0])
    canvas.paint(box, aorta, 8, arterial, where=inside)
    for side in (1, -1):
        box, iliac = shapes.tube([aorta_bottom, [side * 50, -20, -125], [side * 70, 0, -160]], 7)
        canvas.paint(box, iliac, _ILIAC, arterial, where=inside & (canvas.owner != 8))
    box, ivc = shapes.tube([jitter([24, -28, -70], 3), jitter([24, -24, 60], 3), jitter([30, -14, 104], 3)], size([12], 0.85, 1.2)[0])
    canvas.paint(box, ivc, 9, venous, where=inside)
    porta = jitter([36, 6, 56], 4)
    portal = [jitter([-68, -26, 60], 4), jitter([-30, -6, 46], 4), jitter([8, 6, 40], 4), porta, porta + [14, 0, 14]]
    box, portal_mask = shapes.tube(portal, [5, 6, 7, 7, 6])
    canvas.paint(box, portal_mask, 10, venous, where=inside)
    liver_now = canvas.owner == 6
    for _ in range(int(rng.integers(4, 7))):
        target = porta + rng.normal(size=3) * [45, 35, 30] + [18, 0, 10]
        middle = (porta + target) / 2 + rng.normal(size=3) * 8
        box, branch = shapes.tube([porta, middle, target], [4.5, 3.5, 2.5])
        canvas.paint(box, branch, 15, venous, where=liver_now)
    celiac_origin = aorta_top + (aorta_bottom - aorta_top) * ((aorta_top[2] - 82) / (aorta_top[2] - aorta_bottom[2]))
    box, celiac = shapes.tube([celiac_origin, celiac_origin + [3, 24, 3]], 4.2)
    canvas.paint(box, celiac, 25, arterial, where=inside)

    # Bones: spine (with canal), pelvis, femoral heads (x > 0 = right).
    box, vertebrae = shapes.tube([[0, -56, 180], [0, -52, 40], [0, -58, -80], [0, -70, -150]], 19)
    canvas.paint(box, vertebrae, _BONE, hu(260, 40), where=inside)
    box, marrow = shapes.tube([[0, -56, 180], [0, -52, 40], [0, -58, -80], [0, -70, -150]], 13)
    canvas.paint(box, marrow, _MARROW, hu(180, 30), where=inside)
    box, canal = shapes.tube([[0, -80, 180], [0, -77, 40], [0, -82, -80]], 8)
    canvas.paint(box, canal, _CSF, hu(15), where=inside)
    for side in (1, -1):
        box, wing = shapes.ellipsoid([side * 92, -42, -62], [12, 46, 42], _rotation(rz=side * 30), wobble=0.04)
        canvas.paint(box, wing, _BONE, hu(420, 40), where=inside)
    femoral_hu = hu(380, 40)
    for index, x in ((24, 86), (23, -86)):
        center = jitter([x, 2, -124], 4)
        box, cup = shapes.ellipsoid(center, [30, 30, 30])
        canvas.paint(box, cup, _BONE, hu(500, 50), where=inside)
        box, head = shapes.ellipsoid(center, size([23, 23, 23], 0.9, 1.1), wobble=0.02)
        canvas.paint(box, head, index, femoral_hu, where=inside)
        box, neck = shapes.tube([center, center + [np.sign(x) * 40, -5, -45]], 13)
        canvas.paint(box, neck, _BONE, femoral_hu, where=inside & (canvas.owner != index))

    masks = {info.index: np.zeros(shape, dtype=bool) for info in get_taxonomy()}
    for index in range(1, 26):
        masks[index] = canvas.owner == index
    masks[6] |= masks[15]  # the liver includes the vessels running through it

    # Lesions inside their organs; each organ mask then includes its lesions.
    lesion_hu = {27: liver_hu - rng.uniform(35, 60), 26: kidney_hu - rng.uniform(50, 90), 32: hu(6, 4),
                 28: hu(25), 29: liver_hu - rng.uniform(30, 50), 30: hu(35), 31: hu(55)}
    lesions: dict[int, int] = {}
    taxonomy = get_taxonomy()
    for lesion in _LESION_DRAW_ORDER:
        hosts = taxonomy[lesion].parent_organs
        if rng.random() >= lesion_probability:
            continue
        count = 1 if lesion in (28, 30, 31, 29) else int(rng.integers(1, 4))
        for _ in range(count):
            host = int(rng.choice(hosts))
            allowed = masks[host]
            candidates = np.flatnonzero(allowed)
            if candidates.size < 20:
                continue
            center_ijk = np.array(np.unravel_index(int(rng.choice(candidates)), shape), dtype=float)
            center = (grid.ijk_to_patient @ np.append(center_ijk, 1.0))[:3]
            radius = float(rng.uniform(7, 17)) if lesion != 30 else float(rng.uniform(6, 12))
            box, blob = shapes.ellipsoid(center, radius * rng.uniform(0.8, 1.2, size=3), wobble=0.1)
            if box is None:
                continue
            # A hepatic-vessel tumour sits on a vessel inside the liver and grows into the liver around it.
            organ = masks[_LIVER] if host == _HEPATIC_VESSEL else masks[host]
            # Kidney lesions may bulge out of the kidney (exophytic); others stay inside their organ.
            region = ndimage.binary_dilation(organ, iterations=2) if lesion in (26, 32) else organ
            inside_organ = blob & region[box] & inside[box]
            if inside_organ.sum() < 8:
                continue
            masks[lesion][box] |= inside_organ
            canvas.hu[box][inside_organ] = lesion_hu[lesion]
            masks[host][box] |= inside_organ
            if host == _HEPATIC_VESSEL:
                masks[_LIVER][box] |= inside_organ  # the liver includes the vessels running through it
            lesions[lesion] = lesions.get(lesion, 0) + 1
    # A lesion bulging into a neighbour is not that neighbour any more.
    for lesion in (26, 32):
        if masks[lesion].any():
            for other in range(1, 26):
                if other not in (2, 3):
                    masks[other] &= ~masks[lesion]

    # Texture, partial volume, noise; intensities in HU as int16.
    noise = float(rng.uniform(6, 22) if noise_hu is None else noise_hu)
    image = ndimage.gaussian_filter(canvas.hu, sigma=0.6)
    texture = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=1.2)
    image += texture * (noise * 2.0) + rng.standard_normal(shape).astype(np.float32) * noise
    image = np.clip(np.round(image), -1024, 3071).astype(np.int16)

    extra = {"bone": np.isin(canvas.owner, (_BONE, _MARROW)) | masks[23] | masks[24], "heart": canvas.owner == _HEART}
    parameters = dict(pose, orientation=orientation, spacing=list(spacing), contrast_phase=phase, male=male,
                      noise_hu=noise, lesions={str(k): v for k, v in sorted(lesions.items())})
    return Phantom(image=image, affine=affine, masks=masks, extra=extra, seed=seed_value, parameters=parameters)


# ---------------------------------------------------------------------------------- partial-label datasets
#: Partially labelled phantom datasets modelled on the public datasets the Universal Model was trained on.
#: ``labels``: raw label value -> what it marks (a taxonomy name: "kidney" means both kidneys in one label;
#: ``"bone"``/``"heart"`` are unlabelled phantom structures; a raw value of a lesion is painted over its
#: organ, as in the real datasets). Every class not labelled is left as background.
PHANTOM_DATASETS: dict[str, dict[str, Any]] = {
    "btcv": {"labels": {1: "spleen", 2: "right kidney", 3: "left kidney", 4: "gallbladder", 5: "esophagus", 6: "liver",
                        7: "stomach", 8: "aorta", 9: "inferior vena cava", 10: "portal vein and splenic vein",
                        11: "pancreas", 12: "right adrenal gland", 13: "left adrenal gland", 14: "duodenum"}},
    "lits": {"labels": {1: "liver", 2: "liver tumor"}},
    "kits": {"labels": {1: "kidney", 2: "kidney tumor", 3: "kidney cyst"}},
    "msd_pancreas": {"labels": {1: "pancreas", 2: "pancreas tumor"}},
    "msd_hepatic_vessel": {"labels": {1: "hepatic vessel", 2: "hepatic vessel tumor"}},
    "msd_spleen": {"labels": {1: "spleen"}},
    "msd_lung": {"labels": {1: "lung tumor"}},
    "msd_colon": {"labels": {1: "colon tumor"}},
    "abdomenct1k": {"labels": {1: "liver", 2: "kidney", 3: "spleen", 4: "pancreas"}},
    "ctorg": {"labels": {1: "liver", 2: "bladder", 3: "lung", 4: "kidney", 5: "bone"}},
    "word": {"labels": {1: "liver", 2: "spleen", 3: "left kidney", 4: "right kidney", 5: "stomach", 6: "gallbladder",
                        7: "esophagus", 8: "pancreas", 9: "duodenum", 10: "colon", 11: "intestine", 12: "adrenal gland",
                        13: "rectum", 14: "bladder", 15: "left femoral head", 16: "right femoral head"}},
    "amos": {"labels": {1: "spleen", 2: "right kidney", 3: "left kidney", 4: "gallbladder", 5: "esophagus", 6: "liver",
                        7: "stomach", 8: "aorta", 9: "postcava", 10: "pancreas", 11: "right adrenal gland",
                        12: "left adrenal gland", 13: "duodenum", 14: "bladder", 15: "prostate"}},
}

_UNLABELLED_STRUCTURES = ("bone", "heart")


def _target_masks(phantom: Phantom, name: str, taxonomy: Taxonomy) -> tuple[np.ndarray, int]:
    """(mask, paint priority) of what a raw label marks."""
    if name in _UNLABELLED_STRUCTURES:
        return phantom.extra[name], KIND_PRIORITY["organ"]
    classes = taxonomy.resolve(name)
    mask = np.zeros(phantom.shape, dtype=bool)
    for info in classes:
        mask |= phantom.masks[info.index]
    return mask, max(KIND_PRIORITY[info.kind] for info in classes)


def phantom_raw_labels(phantom: Phantom, dataset: str | Mapping[str, Any]) -> np.ndarray:
    """The label map a partially labelled dataset would hold for ``phantom`` (uint8, the dataset's values).

    Labels are painted organ first, then vessels, then lesions (a lesion voxel holds the lesion's value,
    as in LiTS or KiTS); structures the dataset does not label stay background.
    """
    definition = PHANTOM_DATASETS[dataset] if isinstance(dataset, str) else dataset
    taxonomy = get_taxonomy()
    raw = np.zeros(phantom.shape, dtype=np.uint8)
    targets = [(value, *_target_masks(phantom, name, taxonomy)) for value, name in definition["labels"].items()]
    for value, mask, _ in sorted(targets, key=lambda item: item[2]):
        raw[mask] = int(value)
    return raw


def phantom_dataset_spec(dataset: str) -> dict[str, Any]:
    """The dataset's label description in the training package's dataset-spec form (``labels`` section):
    raw value -> taxonomy name, with the unlabelled phantom structures mapped to ``None`` (dropped)."""
    definition = PHANTOM_DATASETS[dataset]
    labels = {int(v): (None if name in _UNLABELLED_STRUCTURES else name) for v, name in definition["labels"].items()}
    return {"name": dataset, "labels": labels}
