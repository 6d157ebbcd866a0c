"""Non-learned right/left lung masking (``COVIDLesionSegLib.lungs``) on the phantom and on real CT."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from COVIDLesionSegLib import progress
from COVIDLesionSegLib.evaluation import read_slice_labels
from COVIDLesionSegLib.lungs import LEFT, RIGHT, segment_lungs, split_right_left
from COVIDLesionSegLib.phantom import make_chest_phantom
from COVIDLesionSegLib.volume import CTVolume
from Testing.conftest import shared_file


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def body_mask(hu: np.ndarray) -> np.ndarray:
    """Independent body mask: largest 3D component of HU > -500, holes filled slice by slice."""
    lab, _ = ndi.label(hu > -500)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    body = lab == np.argmax(sizes)
    return np.stack([ndi.binary_fill_holes(s) for s in body])


# ----------------------------------------------------------------------------------------------- phantom


@pytest.fixture(scope="module")
def phantom_case():
    image, truth = make_chest_phantom(nodule=True)
    vol = CTVolume.from_image(image)
    return vol, truth, segment_lungs(vol.hu, vol.spacing_zyx)


def test_phantom_dice_sides_and_body(phantom_case):
    vol, truth, labels = phantom_case
    assert labels.dtype == np.uint8 and labels.shape == vol.shape
    assert set(np.unique(labels)) == {0, RIGHT, LEFT}
    assert dice(labels == RIGHT, truth["right_lung"]) > 0.9
    assert dice(labels == LEFT, truth["left_lung"]) > 0.9
    assert not (labels[~truth["body"]] > 0).any()


def test_phantom_keeps_pleural_consolidation_that_a_threshold_loses(phantom_case):
    vol, truth, labels = phantom_case
    cons = truth["consolidation"]
    assert (labels[cons] > 0).mean() >= 0.95
    assert (labels[truth["nodule"]] > 0).mean() >= 0.9
    assert (labels[truth["infection"]] > 0).mean() >= 0.95
    # The classic failure this guards against: a plain threshold drops the dense lesion.
    threshold = np.asarray(vol.hu) < -500
    assert threshold[cons].mean() < 0.1


def test_phantom_excludes_trachea_and_main_bronchi(phantom_case):
    _, truth, labels = phantom_case
    airway = truth["airway"]
    assert airway.sum() > 50
    assert (labels[airway] > 0).mean() < 0.02


def test_flipped_storage_gives_same_sides_and_volumes(phantom_case):
    vol, truth, labels = phantom_case
    image = vol.image
    arr = sitk.GetArrayFromImage(image)
    # Same anatomy stored with the x axis reversed: direction -x, origin at the other end.
    flipped = sitk.GetImageFromArray(arr[:, :, ::-1].copy())
    flipped.SetSpacing(image.GetSpacing())
    nx = arr.shape[2]
    origin = list(image.GetOrigin())
    origin[0] += (nx - 1) * image.GetSpacing()[0]
    flipped.SetOrigin(origin)
    flipped.SetDirection((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    # SimpleITK's Flip does the same (it flips the storage and the direction, not the anatomy).
    for stored in (flipped, sitk.Flip(image, [True, False, False])):
        assert sitk.GetArrayFromImage(stored)[0, 0, 0] == arr[0, 0, -1]
        fvol = CTVolume.from_image(stored)
        flabels = segment_lungs(fvol.hu, fvol.spacing_zyx)
        for side in (RIGHT, LEFT):
            assert (flabels == side).sum() == (labels == side).sum()
        back = sitk.GetArrayFromImage(fvol.to_input_geometry(flabels))
        assert np.array_equal(back[:, :, ::-1], labels)


def test_mirrored_anatomy_swaps_sides(phantom_case):
    """A true mirror image (anatomy flipped, direction unchanged): the consolidation, in the right lung
    of the phantom, must now be labelled left. Guards against sides taken from array order."""
    vol, truth, labels = phantom_case
    mirrored = sitk.GetImageFromArray(sitk.GetArrayFromImage(vol.image)[:, :, ::-1].copy())
    mirrored.CopyInformation(vol.image)
    mvol = CTVolume.from_image(mirrored)
    mlabels = segment_lungs(mvol.hu, mvol.spacing_zyx)
    cons = truth["consolidation"]
    assert (labels[cons] == RIGHT).mean() > 0.9
    assert (mlabels[cons[:, :, ::-1]] == LEFT).mean() > 0.9


def test_progress_and_cancel():
    image, _ = make_chest_phantom(shape_zyx=(40, 96, 96), spacing_zyx=(6.0, 3.8, 3.8), infection=False)
    vol = CTVolume.from_image(image)
    seen = []
    segment_lungs(vol.hu, vol.spacing_zyx, progress=lambda f, m: seen.append(f))
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen)

    def cancel(fraction, message):
        if fraction > 0.3:
            raise progress.Cancelled()

    with pytest.raises(progress.Cancelled):
        segment_lungs(vol.hu, vol.spacing_zyx, progress=cancel)


def test_clear_errors():
    with pytest.raises(ValueError, match="3D"):
        segment_lungs(np.zeros((64, 64), np.int16), (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        segment_lungs(np.zeros((8, 8, 8), np.int16), (1.0, 0.0, 1.0))
    soft = np.full((20, 64, 64), 40, np.int16)
    soft[:, :5] = -1000  # air around, but no lungs inside the body
    with pytest.raises(ValueError, match="no lungs found"):
        segment_lungs(soft, (5.0, 5.0, 5.0))
    # An 8-bit windowed image is not in HU: there is no air inside the "body".
    image, _ = make_chest_phantom(shape_zyx=(32, 64, 64), spacing_zyx=(8.0, 5.6, 5.6))
    windowed = np.clip((sitk.GetArrayFromImage(image).astype(np.float32) + 1000) / 1400 * 255, 0, 255)
    with pytest.raises(ValueError, match="Hounsfield"):
        segment_lungs(windowed.astype(np.uint8), (8.0, 5.6, 5.6))


# ------------------------------------------------------------------------------------------- real data

REAL = ("ct/covidctmd_p001_ct.nii.gz", "ct/covidctmd_normal001_ct.nii.gz", "ct/lidc_0001_ct.nii.gz")
_cache: dict[str, tuple[CTVolume, np.ndarray]] = {}


def real_case(relative: str) -> tuple[CTVolume, np.ndarray]:
    """Read and segment a real scan once per test module run (shared by the tests below)."""
    path = shared_file(relative)
    if relative not in _cache:
        vol = CTVolume.from_image(sitk.ReadImage(str(path)), name=relative)
        _cache[relative] = (vol, segment_lungs(vol.hu, vol.spacing_zyx))
    return _cache[relative]


@pytest.fixture(scope="module", autouse=True)
def _drop_cache():
    yield
    _cache.clear()


@pytest.mark.parametrize("relative", REAL)
def test_real_volumes_sides_and_body(relative):
    vol, labels = real_case(relative)
    ml = vol.voxel_volume_ml
    right, left = labels == RIGHT, labels == LEFT
    for mask in (right, left):
        assert 800 <= mask.sum() * ml <= 4500, mask.sum() * ml
    assert np.nonzero(right)[2].mean() < np.nonzero(left)[2].mean()
    # Separate: where they touch, the interface is small compared with the lungs.
    contact = (right[:, :, :-1] & left[:, :, 1:]).sum() + (left[:, :, :-1] & right[:, :, 1:]).sum()
    assert contact < 0.005 * min(right.sum(), left.sum())
    body = body_mask(np.asarray(vol.hu))
    assert (labels[~body] > 0).sum() <= 1e-4 * (labels > 0).sum()


@pytest.mark.parametrize("relative", REAL[:2])
def test_real_trachea_excluded(relative):
    """The midline air column in the upper lung slices (the trachea) is not in the mask."""
    vol, labels = real_case(relative)
    hu = np.asarray(vol.hu)
    sy, sx = vol.spacing_zyx[1:]
    zs = np.nonzero((labels == RIGHT).any(axis=(1, 2)) & (labels == LEFT).any(axis=(1, 2)))[0]
    top = zs[-max(3, len(zs) // 10):]
    found = 0
    for z in top:
        body = ndi.binary_fill_holes(hu[z] > -500)
        xs = np.nonzero(body.any(axis=0))[0]
        centre = 0.5 * (xs.min() + xs.max())
        lab, n = ndi.label((hu[z] < -900) & body)
        best = None
        for i, sl in enumerate(ndi.find_objects(lab), start=1):
            area = (lab[sl] == i).sum() * sy * sx
            cx = 0.5 * (sl[1].start + sl[1].stop)
            if 80 <= area <= 700 and abs(cx - centre) * sx < 25:
                best = i if best is None else best
        if best is None:
            continue
        found += 1
        assert not (labels[z][lab == best] > 0).any(), f"trachea voxels in the lung mask at z={z}"
    assert found >= 2, "no trachea found in the upper lung slices: the check did not run"


def test_real_lidc_nodule_inside_lungs():
    vol, labels = real_case("ct/lidc_0001_ct.nii.gz")
    nodule_img = sitk.ReadImage(str(shared_file("ct/lidc_0001_nodules.nii.gz")))
    nodule = sitk.GetArrayFromImage(sitk.DICOMOrient(nodule_img, "LPS")) > 0
    assert nodule.shape == labels.shape and nodule.sum() > 1000
    assert (labels[nodule] > 0).mean() >= 0.95


def test_real_covid_infected_slices_and_dense_lesions_kept():
    vol, labels = real_case("ct/covidctmd_p001_ct.nii.gz")
    labels_p001 = read_slice_labels(shared_file("ct/covidctmd_slice_labels.csv"), "covidctmd_p001_ct.nii.gz")
    infected = labels_p001["z"][labels_p001["infected"]].tolist()
    assert len(infected) == 80
    zs = np.nonzero((labels > 0).any(axis=(1, 2)))[0]
    assert zs.min() <= min(infected) and max(infected) <= zs.max()
    hu = np.asarray(vol.hu)
    lungs = labels > 0
    # Compared with a plain -500 HU threshold of the same lung region, the mask loses nothing and
    # keeps dense (consolidated / vessel) tissue that the threshold drops.
    near = ndi.binary_dilation(lungs, iterations=2)
    plain = (hu < -500) & near
    plain_lungs = plain & ndi.binary_erosion(near, iterations=4)  # away from the trachea/bronchi rim
    assert lungs.sum() >= plain_lungs.sum()
    rows = np.array(sorted(set(infected)))
    dense_ml = ((hu[rows] > -300) & lungs[rows]).sum() * vol.voxel_volume_ml
    assert dense_ml > 20.0, dense_ml


# ------------------------------------------------------------------------------------------------------------
# split_right_left: the one right/left rule of the HU model and of learned binary lung models
# ------------------------------------------------------------------------------------------------------------

def test_split_right_left_two_lungs_and_fragments():
    mask = np.zeros((6, 20, 40), bool)
    mask[:, 4:16, 2:16] = True    # array-left block: patient right in LPS
    mask[:, 4:16, 24:38] = True   # patient left
    mask[2, 1, 36] = True          # a detached fragment near the left lung
    right, left = split_right_left(mask, (2.0, 1.0, 1.0))
    assert right[:, 4:16, 2:16].all() and not right[:, :, 20:].any()
    assert left[:, 4:16, 24:38].all() and left[2, 1, 36]
    assert not (right & left).any()
    right, left = split_right_left(mask, (2.0, 1.0, 1.0), keep_fragments=False)
    assert not left[2, 1, 36] and right.sum() + left.sum() == mask.sum() - 1


def test_split_right_left_touching_lungs_are_cut_at_the_narrow_junction():
    mask = np.zeros((8, 30, 60), bool)
    mask[:, 5:25, 4:28] = True
    mask[:, 5:25, 32:56] = True
    mask[:, 13:17, 28:32] = True  # a thin bridge: one component
    right, left = split_right_left(mask, (1.0, 1.0, 1.0))
    assert right[:, 5:25, 4:27].all() and left[:, 5:25, 33:56].all()
    assert ((right | left) == mask).all() and not (right & left).any()


def test_split_right_left_single_blob_falls_back_to_the_midline():
    mask = np.zeros((4, 10, 20), bool)
    mask[:, 2:8, 3:17] = True  # no junction to cut: the mask's mid-sagittal plane
    right, left = split_right_left(mask, (1.0, 1.0, 1.0))
    assert right[:, 2:8, 3:10].all() and left[:, 2:8, 10:17].all()
    assert ((right | left) == mask).all()


def test_split_right_left_empty_mask():
    right, left = split_right_left(np.zeros((3, 4, 5), bool), (1.0, 1.0, 1.0))
    assert not right.any() and not left.any()


# ------------------------------------------------------------------------------------------------------------
# The fast equivalents inside lungs.py must give exactly what the library functions they replace give
# ------------------------------------------------------------------------------------------------------------

def test_convex_hull_2d_matches_skimage():
    from skimage.morphology import convex_hull_image

    from COVIDLesionSegLib.lungs import convex_hull_2d

    rng = np.random.default_rng(7)
    checked = 0
    for trial in range(400):
        h, w = (int(v) for v in rng.integers(1, 48, 2))
        if trial % 4 == 0:   # scattered pixels, single rows and columns
            mask = np.zeros((h, w), bool)
            k = int(rng.integers(1, 5))
            mask[rng.integers(0, h, k), rng.integers(0, w, k)] = True
        else:
            mask = ndi.gaussian_filter(rng.random((h, w)), rng.uniform(0.5, 4.0)) > rng.uniform(0.4, 0.7)
        if not mask.any():
            continue
        assert np.array_equal(convex_hull_2d(mask), convex_hull_image(mask)), (trial, mask.astype(int))
        checked += 1
    assert checked > 300


def test_fill_holes_2d_and_squared_distance_match_scipy():
    from COVIDLesionSegLib.lungs import _SLICE_STRUCTURE, fill_holes_2d, squared_distance_to

    rng = np.random.default_rng(3)
    mask = ndi.gaussian_filter(rng.random((12, 40, 50)), 1.5) > 0.5
    mask[:, 0, :] = True   # shapes touching the border, where "outside" matters
    assert np.array_equal(fill_holes_2d(mask), ndi.binary_fill_holes(mask, structure=_SLICE_STRUCTURE))
    spacing = (2.0, 2.25, 2.25)
    expected = ndi.distance_transform_edt(~mask, sampling=spacing) ** 2
    got = squared_distance_to(mask, spacing)
    assert np.allclose(np.maximum(got, 0), expected, rtol=1e-6, atol=1e-4)
    assert np.array_equal(got <= 100.0, expected <= 100.0)
    assert np.isinf(squared_distance_to(np.zeros((3, 4, 5), bool), spacing)).all()
