"""Post-processing: exact agreement with the official organ_post_process (fidelity fixture), the fixed
behaviours, and the rules on real organ masks (TotalSegmentator example CT)."""
from __future__ import annotations

import warnings

import cc3d
import nibabel as nib
import numpy as np
import pytest
from conftest import require_shared
from scipy import ndimage

from UniversalSegLib.postprocess import (
    CLASS_RULES,
    MissingInputError,
    OfficialBehaviourWarning,
    PostprocessError,
    Rule,
    keep_largest_components,
    postprocess_masks,
    required_classes,
)

CUBE = np.ones((5, 5, 5), dtype=bool)


# -- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fixture_case():
    """The official post-processing fixture: (pred, expected), each (2 cases, 32 classes, 64^3) bool."""
    data = np.load(require_shared("reference/fixture/postproc_case.npz"))
    shape = tuple(int(s) for s in data["shape"])
    count = int(np.prod(shape))

    def unpack(key):
        return np.unpackbits(data[key], count=count).reshape(shape).astype(bool)

    assert list(data["organ_list"]) == list(range(1, 33))
    return unpack("pred"), unpack("expected")


def as_dict(channels: np.ndarray) -> dict[int, np.ndarray]:
    return {index + 1: channels[index] for index in range(channels.shape[0])}


@pytest.fixture(scope="module")
def totalseg():
    """TotalSegmentator's example segmentation (a real abdomen, 3 mm), RAS-oriented like our
    preprocessed grid: axis 0 increases towards the patient's right."""
    image = nib.as_closest_canonical(
        nib.load(require_shared("data/totalsegmentator/example_seg_fast_force_split.nii.gz"))
    )
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    return np.asarray(image.dataobj).astype(np.int16)


def reference_largest(mask: np.ndarray, k: int) -> np.ndarray:
    """Independent re-statement of the official selection: cc3d labels of the WHOLE array, a stable
    descending sort of (label, size) pairs in label order, the first k kept."""
    labels = cc3d.connected_components(np.ascontiguousarray(mask), connectivity=26)
    sizes = [(label, int(np.count_nonzero(labels == label))) for label in range(1, int(labels.max()) + 1)]
    ranked = sorted(sizes, key=lambda item: item[1], reverse=True)
    out = np.zeros(mask.shape, dtype=bool)
    for label, size in ranked[:k]:
        if size > 0:
            out |= labels == label
    return out


# -- fidelity: the official fixture -------------------------------------------------------------------


@pytest.mark.parametrize("case", [0, 1])
def test_official_mode_matches_the_official_output_exactly(fixture_case, case):
    pred, expected = fixture_case
    out = postprocess_masks(as_dict(pred[case]), classes=list(range(1, 33)), mode="official")
    assert list(out) == list(range(1, 33))
    for index in range(1, 33):
        assert out[index].dtype == bool and out[index].shape == pred.shape[2:]
        assert np.array_equal(out[index], expected[case, index - 1]), f"class {index} differs"


def test_fixed_mode_matches_the_fixture_except_the_dropped_touching_lungs(fixture_case):
    pred, expected = fixture_case
    for case in (0, 1):
        out = postprocess_masks(as_dict(pred[case]))  # default: fixed, all keys
        fixed_here = {16, 17} if case == 1 else set()
        for index in set(range(1, 33)) - fixed_here:
            assert np.array_equal(out[index], expected[case, index - 1]), f"case {case} class {index}"

    # Case 1: the two lung channels touch (one component): the official code empties both lungs.
    assert not expected[1, 15].any() and not expected[1, 16].any()
    union = pred[1, 15] | pred[1, 16]
    assert cc3d.connected_components(union, connectivity=26, return_N=True)[1] == 1
    right, left = out[16], out[17]
    assert right.any() and left.any() and not (right & left).any()
    assert np.array_equal(right | left, union)  # every voxel kept, nothing invented
    for lung in (right, left):
        assert cc3d.connected_components(lung, connectivity=26, return_N=True)[1] == 1
    # Each channel keeps what only it voted for; the contested voxels (both channels) go to the side
    # nearer to their own channel's voxels, so the two lungs are separated along axis 0.
    assert not (pred[1, 15] & ~pred[1, 16] & ~right).any()
    assert not (pred[1, 16] & ~pred[1, 15] & ~left).any()
    contested = pred[1, 15] & pred[1, 16]
    assert contested.any()
    assert np.nonzero(right)[0].max() < np.nonzero(left)[0].min()  # channel 16 lies at low axis 0 here


def test_largest_component_ties_follow_the_official_order():
    rng = np.random.default_rng(3)
    for trial in range(4):
        mask = np.zeros((30, 26, 34), dtype=bool)
        # Many equally large cubes (and a few larger/smaller ones) at random places, some touching.
        for _ in range(12):
            size = int(rng.choice([2, 2, 2, 3]))
            x, y, z = (int(rng.integers(0, s - size)) for s in mask.shape)
            mask[x : x + size, y : y + size, z : z + size] = True
        for k in (1, 2, 3):
            assert np.array_equal(keep_largest_components(mask, k), reference_largest(mask, k))
            # The memory order of the input must not change which tie wins.
            assert np.array_equal(keep_largest_components(np.asfortranarray(mask), k), reference_largest(mask, k))


# -- tumour filter -----------------------------------------------------------------------------------


def _kidney_tumour_case(rng: np.random.Generator):
    """Two kidneys (plus a stray blob) near the array border and a tumour mask scattered around them."""
    shape = (40, 36, 30)
    kidneys = np.zeros(shape, dtype=bool)
    kidneys[0:2, 5:15, 3:12] = True  # a thin slab on the array border (axis 0)
    kidneys[25:34, 20:31, 22:30] = True  # touches the border (axis 2)
    kidneys[18:20, 2:4, 2:4] = True  # small stray blob: not among the two largest
    right = kidneys.copy()
    right[:, :, :] &= np.arange(shape[0])[:, None, None] < 20
    left = kidneys & ~right
    tumour = rng.random(shape) < 0.3
    return {2: right, 3: left, 26: tumour}


def test_official_tumour_filter_equals_scipy_closing_then_dilation():
    masks = _kidney_tumour_case(np.random.default_rng(0))
    organ = reference_largest(masks[2] | masks[3], 2)
    region = ndimage.binary_dilation(ndimage.binary_closing(organ, structure=CUBE), structure=CUBE)
    out = postprocess_masks(masks, classes=[26], mode="official")
    assert np.array_equal(out[26], masks[26] & region)
    # The official closing erodes a thin organ at the array border, so tumour voxels there are lost ...
    lost = masks[26] & organ & ~region
    assert lost.any()


def test_fixed_tumour_filter_keeps_organ_voxels_at_the_array_border():
    masks = _kidney_tumour_case(np.random.default_rng(0))
    organ = reference_largest(masks[2] | masks[3], 2)
    dilated = ndimage.binary_dilation(organ, structure=CUBE)
    closed = ndimage.binary_erosion(dilated, structure=CUBE, border_value=1)
    region = ndimage.binary_dilation(closed, structure=CUBE)
    out = postprocess_masks(masks, classes=[26])
    assert np.array_equal(out[26], masks[26] & region)
    assert not (masks[26] & organ & ~out[26]).any()  # ... but not here: every tumour voxel in the organ stays
    assert not (out[26] & ~ndimage.binary_dilation(organ, structure=CUBE, iterations=2)).any()


def test_liver_tumour_is_kept_only_near_the_liver(totalseg):
    liver = totalseg == 5  # reaches the top of the scan (last axial slice)
    near = ndimage.binary_dilation(liver, iterations=1) & ~liver  # touching the liver surface
    far = np.zeros_like(liver)
    far[5:9, 5:9, 5:9] = True  # far from the liver
    assert not (far & ndimage.binary_dilation(liver, iterations=8)).any()
    tumour = (liver & (np.indices(liver.shape)[2] % 7 == 0)) | near | far
    inner = np.zeros_like(liver)  # voxels at least 3 voxels from the array border
    inner[3:-3, 3:-3, 3:-3] = True
    for mode in ("fixed", "official"):
        out = postprocess_masks({6: liver, 27: tumour}, classes=[27], mode=mode)[27]
        assert np.array_equal(out & liver & inner, tumour & liver & inner)
        assert np.array_equal(out & near & inner, near & inner)
        assert not (out & far).any()
        if mode == "fixed":
            assert np.array_equal(out, tumour & ~far)
        else:  # the official closing erodes the liver at the scan border: lesion voxels there are lost
            lost = near & ~out
            assert lost.any() and not (lost & inner).any()


# -- vein above pancreas -----------------------------------------------------------------------------


def _vein_case(totalseg):
    pancreas = totalseg == 7
    vein = totalseg == 64
    lowest = int(np.flatnonzero(keep_largest_components(pancreas).any(axis=(0, 1)))[0])
    vein[50:53, 40:43, lowest - 12 : lowest + 2] = True  # a vein stretch reaching below the pancreas
    return pancreas, vein, lowest


def test_vein_is_cut_below_the_pancreas_on_a_real_abdomen(totalseg):
    pancreas, vein, lowest = _vein_case(totalseg)
    assert vein[:, :, :lowest].any()
    for mode in ("fixed", "official"):
        out = postprocess_masks({10: vein, 11: pancreas}, classes=[10, 11], mode=mode)
        assert not out[10][:, :, :lowest].any()
        assert np.array_equal(out[10][:, :, lowest:], vein[:, :, lowest:])
        # The pancreas itself: its largest component (TotalSegmentator split it into 4 pieces).
        assert np.array_equal(out[11], reference_largest(pancreas, 1))
        assert out[11].sum() < pancreas.sum()


def test_official_vein_cut_depends_on_what_else_was_requested(totalseg):
    pancreas, vein, _ = _vein_case(totalseg)
    masks = {10: vein, 11: pancreas}
    cut = postprocess_masks(masks, classes=[10, 11], mode="official")[10]
    assert not np.array_equal(cut, vein)
    # Official quirks: without 11, or with 11 listed before 10, the vein stays raw.
    assert np.array_equal(postprocess_masks(masks, classes=[10], mode="official")[10], vein)
    assert np.array_equal(postprocess_masks(masks, classes=[11, 10], mode="official")[10], vein)
    # Fixed: the result of a class does not depend on the rest of the request.
    for classes in ([10], [11, 10], [10, 11]):
        assert np.array_equal(postprocess_masks(masks, classes=classes)[10], cut)


def test_empty_pancreas_keeps_the_vein(totalseg):
    vein = totalseg == 64
    masks = {10: vein, 11: np.zeros_like(vein)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fixed mode: no warning at all
        fixed = postprocess_masks(masks)
    assert np.array_equal(fixed[10], vein) and not fixed[11].any()
    # The official code crashes here (np.min of an empty array); official mode says so and goes on.
    with pytest.warns(OfficialBehaviourWarning, match="pancreas"):
        official = postprocess_masks(masks, mode="official")
    assert np.array_equal(official[10], vein)


# -- lungs -------------------------------------------------------------------------------------------


def _real_lungs(totalseg):
    """Right lung = TotalSegmentator right lower lobe, left = left upper + lower lobes (largest parts)."""
    right = keep_largest_components(totalseg == 14)
    left = keep_largest_components(np.isin(totalseg, (10, 11)))
    return right, left


def test_lungs_are_labelled_by_position_on_a_real_scan(totalseg):
    right, left = _real_lungs(totalseg)
    assert np.nonzero(left)[0].mean() < np.nonzero(right)[0].mean()  # RAS: the left lung has low axis 0
    # The model mixed the channels up: some right-lung voxels were voted "left" and vice versa.
    swapped_right = right & (np.indices(right.shape)[2] % 3 == 0)
    votes = {16: (right & ~swapped_right), 17: left | swapped_right}
    for mode in ("fixed", "official"):
        out = postprocess_masks(votes, classes=[16, 17], mode=mode)
        assert np.array_equal(out[16], right) and np.array_equal(out[17], left)


def test_touching_lungs_are_split_not_dropped(totalseg):
    right, left = _real_lungs(totalseg)
    # Join them with a 1-voxel path that both channels voted for, in the highest slice holding both:
    # from the left lung's rightmost voxel along axis 0, then along axis 1, to the right lung.
    z = int(np.flatnonzero(right.any(axis=(0, 1)) & left.any(axis=(0, 1)))[-1])
    xl, yl = (int(v[-1]) for v in np.nonzero(left[:, :, z]))
    xr, yr = (int(v[0]) for v in np.nonzero(right[:, :, z]))
    bridge = np.zeros_like(right)
    bridge[xl : xr + 1, yl, z] = True
    bridge[xr, min(yl, yr) : max(yl, yr) + 1, z] = True
    bridge &= ~(left | right)
    votes = {16: right | bridge, 17: left | bridge}
    assert cc3d.connected_components(votes[16] | votes[17], connectivity=26, return_N=True)[1] == 1

    official = postprocess_masks(votes, mode="official")
    assert not official[16].any() and not official[17].any()

    fixed = postprocess_masks(votes)
    assert np.array_equal(fixed[16] & ~bridge, right) and np.array_equal(fixed[17] & ~bridge, left)
    assert np.array_equal(fixed[16] | fixed[17], right | left | bridge)
    assert not (fixed[16] & fixed[17]).any()


def test_a_single_lung_is_kept_by_its_channel(totalseg):
    right, left = _real_lungs(totalseg)
    for lung, index, other in ((right, 16, 17), (left, 17, 16)):
        votes = {index: lung, other: np.zeros_like(lung)}
        official = postprocess_masks(votes, classes=[16, 17], mode="official")
        assert not official[16].any() and not official[17].any()
        fixed = postprocess_masks(votes, classes=[16, 17])
        assert np.array_equal(fixed[index], lung) and not fixed[other].any()
        # A thin rim of it voted for the other side only: the lung keeps its label (and the rest of
        # its voxels); the rim becomes a small second "lung", as the votes say.
        rim = lung & (np.indices(lung.shape)[0] <= np.nonzero(lung)[0].min() + 1)
        assert 0 < rim.sum() < 0.1 * lung.sum()
        fixed = postprocess_masks({index: lung & ~rim, other: rim}, classes=[16, 17])
        assert np.array_equal(fixed[index], keep_largest_components(lung & ~rim))
        assert np.array_equal(fixed[other], keep_largest_components(rim))


def test_left_lung_alone(totalseg):
    right, left = _real_lungs(totalseg)
    votes = {16: right, 17: left}
    assert not postprocess_masks(votes, classes=[17], mode="official")[17].any()  # official never writes it
    assert np.array_equal(postprocess_masks(votes, classes=[17])[17], left)
    assert list(postprocess_masks(votes, classes=[17])) == [17]  # only requested classes come back


# -- organs, pass-through, inputs --------------------------------------------------------------------


def test_real_organs_lose_their_stray_blobs(totalseg):
    classes = {1: 1, 2: 2, 3: 3, 6: 5}  # ours: TotalSegmentator label (spleen, kidneys, liver)
    masks = {}
    for index, label in classes.items():
        organ = totalseg == label
        organ[110:112, 2:4, 2 + 3 * index : 4 + 3 * index] = True  # a stray 8-voxel blob
        masks[index] = organ
    out = postprocess_masks(masks, mode="official")
    for index, label in classes.items():
        assert np.array_equal(out[index], totalseg == label)


def test_unknown_and_unfiltered_classes_pass_through_and_inputs_are_untouched():
    rng = np.random.default_rng(1)
    masks = {index: rng.random((12, 10, 8)) < 0.4 for index in (15, 28, 32, 33, 40)}
    masks[1] = rng.random((12, 10, 8)) < 0.4
    copies = {index: mask.copy() for index, mask in masks.items()}
    out = postprocess_masks(masks)
    for index in (15, 28, 32, 33, 40):
        assert np.array_equal(out[index], masks[index]) and out[index] is not masks[index]
    assert out[1].sum() < masks[1].sum()
    for index in masks:
        assert np.array_equal(masks[index], copies[index])
    assert CLASS_RULES[28].rule is Rule.KEEP and 40 not in CLASS_RULES


def test_integer_masks_are_accepted():
    mask = np.zeros((8, 8, 8), dtype=np.uint8)
    mask[1:3, 1:3, 1:3] = 1
    mask[6, 6, 6] = 1
    out = postprocess_masks({5: mask, 6: mask.astype(np.float32)})
    assert out[5].sum() == 8 and out[6].sum() == 8 and out[5].dtype == bool


def test_required_classes():
    assert required_classes([26]) == [2, 3, 26]
    assert required_classes([27, 28]) == [6, 27, 28]
    assert required_classes([10]) == [10, 11]
    assert required_classes([10], mode="official") == [10]
    assert required_classes([17]) == [16, 17]
    assert required_classes([17], mode="official") == [17]
    assert required_classes([16], mode="official") == [16, 17]
    assert required_classes(range(1, 33)) == list(range(1, 33))


def test_bad_inputs_get_clear_errors():
    mask = np.zeros((4, 4, 4), dtype=bool)
    with pytest.raises(MissingInputError, match=r"class 26 \(Kidney Tumor\).*\[2, 3\]"):
        postprocess_masks({26: mask})
    with pytest.raises(MissingInputError, match=r"requested class\(es\) \[7\]"):
        postprocess_masks({6: mask}, classes=[7])
    with pytest.raises(PostprocessError, match="share one grid"):
        postprocess_masks({1: mask, 2: np.zeros((4, 4, 5), dtype=bool)})
    with pytest.raises(PostprocessError, match="other than 0 and 1"):
        postprocess_masks({1: np.full((4, 4, 4), 0.7)})
    with pytest.raises(PostprocessError, match="3-D"):
        postprocess_masks({1: np.zeros((4, 4), dtype=bool)})
    with pytest.raises(PostprocessError, match="1-based"):
        postprocess_masks({0: mask})
    with pytest.raises(PostprocessError, match="mode"):
        postprocess_masks({1: mask}, mode="strict")
    with pytest.raises(PostprocessError, match="non-empty"):
        postprocess_masks({})
