"""The network predictor (network_predictor.py): 2D and 3D inference through checkpoints, geometry,
lung models, devices, cancellation and the CUDA out-of-memory fallback."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage as ndi

from COVIDLesionSegLib.models import registry
from COVIDLesionSegLib.models.checkpoint import Checkpoint
from COVIDLesionSegLib.network_predictor import (
    DeviceError,
    NetworkInfectionModel,
    NetworkLungModel,
    NetworkModel,
    resolve_device,
)
from COVIDLesionSegLib.predictor import InfectionModel, LungModel
from COVIDLesionSegLib.progress import Cancelled
from COVIDLesionSegLib.volume import CTVolume, Geometry
from Testing.conftest import shared_file
from Testing.engine.helpers import _checkpoint, _linear, _LungRule, _spec, _tiny, pretend_full_gpu

torch.set_num_threads(2)


# ------------------------------------------------------------------------------------------------------------
# Test-only networks
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def _archs(test_archs):
    """Every test here runs with the test-only architectures registered (Testing/conftest.py)."""


# ------------------------------------------------------------------------------------------------------------
# Synthetic CT
# ------------------------------------------------------------------------------------------------------------

SHAPE = (14, 40, 48)          # z, y, x (canonical LPS)
SPACING_XYZ = (0.8, 0.8, 2.5)


def _phantom(fill_body: bool = False):
    """HU phantom: body 40 HU, lungs -850 HU (right lung at small x), a -100 HU lesion in the right lung."""
    z, y, x = np.mgrid[:SHAPE[0], :SHAPE[1], :SHAPE[2]].astype(np.float32)
    hu = np.full(SHAPE, -1000.0 if not fill_body else 40.0, np.float32)
    body = ((y - 20) / 18) ** 2 + ((x - 24) / 22) ** 2 <= 1
    hu[body] = 40
    right = (((z - 7) / 5.5) ** 2 + ((y - 20) / 12) ** 2 + ((x - 14) / 7) ** 2) <= 1
    left = (((z - 7) / 5.5) ** 2 + ((y - 20) / 12) ** 2 + ((x - 34) / 7) ** 2) <= 1
    hu[right | left] = -850
    lesion = (((z - 7) / 2.5) ** 2 + ((y - 22) / 5) ** 2 + ((x - 13) / 4) ** 2) <= 1
    hu[lesion] = -100
    labels = np.zeros(SHAPE, np.uint8)
    labels[right] = 1
    labels[left] = 2
    return hu.astype(np.int16), labels, lesion


def _volume(hu: np.ndarray, orientation: str = "LPS") -> CTVolume:
    img = sitk.GetImageFromArray(hu)
    img.SetSpacing(SPACING_XYZ)
    img.SetOrigin((-20.0, 5.0, 100.0))
    if orientation != "LPS":
        img = sitk.DICOMOrient(img, orientation)  # same anatomy stored in another axis order
    return CTVolume.from_image(img, name="phantom")


def _box_mask(mask: np.ndarray) -> np.ndarray:
    out = np.zeros(mask.shape, bool)
    idx = np.nonzero(mask)
    out[tuple(slice(i.min(), i.max() + 1) for i in idx)] = True
    return out


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


# ------------------------------------------------------------------------------------------------------------
# Output contract with random tiny networks
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dims, crop", [(2, "none"), (2, "lung_bbox"), (3, None)])
def test_random_network_output_contract(tmp_path, dims, crop):
    torch.manual_seed(0)
    extra = {"crop": crop} if crop else {}
    path = _checkpoint(tmp_path, f"test-pred-tiny{dims}d", _tiny(dims), dims, **extra)
    model = NetworkModel(path, device="cpu", margin_mm=0.0, batch_size=3)
    assert isinstance(model, NetworkInfectionModel) and isinstance(model, InfectionModel)
    assert not isinstance(model, LungModel)
    assert model.info.task == "infection" and model.info.device == "cpu" and model.info.model_id == "m"

    hu, labels, _ = _phantom()
    vol = _volume(hu)
    prob = model.predict(vol, labels)
    assert prob.dtype == np.float32 and prob.shape == vol.shape
    assert np.isfinite(prob).all() and prob.min() >= 0.0 and prob.max() <= 1.0
    box = _box_mask(labels > 0)
    assert not prob[~box].any(), "probabilities must be zero outside the lung bounding box"
    assert (prob[box & (labels > 0)] > 0).all(), "a sigmoid output is positive wherever the network ran"


def test_no_lungs_gives_zeros(tmp_path):
    path = _checkpoint(tmp_path, "test-pred-tiny2d", _tiny(2), 2)
    hu, labels, _ = _phantom()
    calls = []
    prob = NetworkModel(path, device="cpu").predict(_volume(hu), np.zeros_like(labels), lambda f, m: calls.append(f))
    assert prob.shape == hu.shape and not prob.any()
    assert calls and calls[-1] == 1.0


def test_mask_shape_mismatch(tmp_path):
    path = _checkpoint(tmp_path, "test-pred-tiny2d", _tiny(2), 2)
    hu, labels, _ = _phantom()
    with pytest.raises(ValueError, match="does not match the volume"):
        NetworkModel(path, device="cpu").predict(_volume(hu), labels[:-1])


# ------------------------------------------------------------------------------------------------------------
# Geometry: a network whose answer is known finds the lesion where it is, through resizing/resampling
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("orientation", ["LPS", "RAI"])
def test_known_network_finds_the_lesion(tmp_path, dims, orientation):
    path = _checkpoint(tmp_path, f"test-pred-linear{dims}d", _linear(dims), dims)
    hu, labels, lesion = _phantom()
    vol = _volume(hu, orientation)
    assert vol.shape == hu.shape and np.array_equal(vol.hu, hu), "canonical array is the LPS phantom"
    prob = NetworkModel(path, device="cpu").predict(vol, labels)
    # Slices are resized 40x48 -> 32x32 and back, which blurs the lung/tissue boundary (partial volume):
    # judge the lung interior, 2 voxels in from the boundary in-plane.
    inside = ndi.binary_erosion(labels > 0, structure=np.ones((1, 5, 5), bool))
    found = (prob > 0.5) & inside
    assert _dice(found, lesion & inside) > 0.9
    zz, yy, xx = np.nonzero(found)
    z0, y0, x0 = np.nonzero(lesion)
    assert abs(yy.mean() - y0.mean()) < 0.5 and abs(xx.mean() - x0.mean()) < 0.5, "no shift from resizing"
    # The lesion is in the right lung (small x): nothing is found in the left lung.
    assert not found[labels == 2].any()


# ------------------------------------------------------------------------------------------------------------
# Lung models
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dims", [2, 3])
def test_three_class_lung_model_maps_classes_by_name(tmp_path, dims):
    # Channel 2 is the right lung here: the predictor must follow the names, not the channel order.
    path = _checkpoint(tmp_path, "test-pred-lungrule", _LungRule(right=2, left=1), dims, task="lungs",
                       labels={"0": "background", "1": "left lung", "2": "right lung"},
                       output={"activation": "softmax", "foreground_channel": 1},
                       **({"patch_size": [8, 40, 48], "spacing_zyx": [2.5, 0.8, 0.8]} if dims == 3 else
                          {"slice_size": [40, 48]}))
    model = NetworkModel(path, device="cpu")
    assert isinstance(model, NetworkLungModel) and isinstance(model, LungModel)
    assert not isinstance(model, InfectionModel)
    hu, labels, lesion = _phantom(fill_body=True)
    seg = model.segment(_volume(hu))
    assert seg.dtype == np.uint8 and seg.shape == hu.shape
    aerated = labels > 0
    aerated[lesion] = False
    assert _dice(seg == 1, (labels == 1) & aerated) > 0.9
    assert _dice(seg == 2, labels == 2) > 0.9


def test_binary_lung_model_is_split_right_left(tmp_path):
    net = _linear(2)
    with torch.no_grad():  # lung where HU < -500
        net.weight.fill_(-20.0)
        net.bias.fill_(10.0)
    path = _checkpoint(tmp_path, "test-pred-linear2d", net, 2, task="lungs",
                       labels={"0": "background", "1": "lungs"})
    hu, labels, lesion = _phantom(fill_body=True)
    seg = NetworkModel(path, device="cpu").segment(_volume(hu))
    aerated = labels > 0
    aerated[lesion] = False
    assert _dice(seg == 1, (labels == 1) & aerated) > 0.85
    assert _dice(seg == 2, labels == 2) > 0.85


# ------------------------------------------------------------------------------------------------------------
# Progress, cancellation, devices
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dims", [2, 3])
def test_progress_and_cancellation(tmp_path, dims):
    path = _checkpoint(tmp_path, f"test-pred-tiny{dims}d", _tiny(dims), dims)
    model = NetworkModel(path, device="cpu", batch_size=1)
    hu, labels, _ = _phantom()
    vol = _volume(hu)
    seen = []
    model.predict(vol, labels, lambda f, m: seen.append((f, m)))
    fractions = [f for f, _ in seen]
    assert len(seen) >= 5 and fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert all(0.0 <= f <= 1.0 for f in fractions)

    calls = []

    def cancel(fraction, message):
        calls.append(fraction)
        if len(calls) == 2:
            raise Cancelled()

    with pytest.raises(Cancelled):
        model.predict(vol, labels, cancel)
    assert len(calls) == 2, "no batch runs after the callback cancelled"


def test_default_progress_from_constructor(tmp_path):
    path = _checkpoint(tmp_path, "test-pred-tiny2d", _tiny(2), 2)
    seen = []
    model = NetworkModel(path, device="cpu", progress=lambda f, m: seen.append(m))
    assert any("loading" in m for m in seen)
    hu, labels, _ = _phantom()
    model.predict(_volume(hu), labels)
    assert any("slices" in m for m in seen)


def test_devices(tmp_path):
    path = _checkpoint(tmp_path, "test-pred-tiny2d", _tiny(2), 2)
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match="not supported|unknown device"):
        resolve_device("tpu")
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here; the missing-CUDA message cannot be tested")
    with pytest.raises(DeviceError, match="CUDA is not available.*'auto' or 'cpu'"):
        NetworkModel(path, device="cuda")
    assert NetworkModel(path, device="auto").info.device == "cpu"


def test_constructor_argument_errors(tmp_path):
    path = _checkpoint(tmp_path, "test-pred-tiny2d", _tiny(2), 2)
    with pytest.raises(ValueError, match="amp must be"):
        NetworkModel(path, device="cpu", amp="float8")
    with pytest.raises(ValueError, match="batch_size"):
        NetworkModel(path, device="cpu", batch_size=0)
    with pytest.raises(ValueError, match="overlap"):
        NetworkModel(path, device="cpu", overlap=1.0)
    from COVIDLesionSegLib.models.checkpoint import CheckpointError, file_sha256
    assert NetworkModel(path, device="cpu", expected_sha256=file_sha256(path)).info.model_id == "m"
    with pytest.raises(CheckpointError, match="manifest expects"):
        NetworkModel(path, device="cpu", expected_sha256="f" * 64)


def test_cuda_out_of_memory_falls_back_to_cpu(tmp_path, monkeypatch):
    path = _checkpoint(tmp_path, "test-pred-tiny2d", _tiny(2), 2)
    model = NetworkModel(path, device="cpu")
    hu, labels, _ = _phantom()
    vol = _volume(hu)
    expected = model.predict(vol, labels)

    attempts = pretend_full_gpu(model, monkeypatch)
    with pytest.warns(RuntimeWarning, match="out of memory"):
        prob = model.predict(vol, labels)
    assert attempts == ["cuda", "cpu"]
    np.testing.assert_array_equal(prob, expected)
    assert model.info.device == "cpu" and model.device.type == "cpu"
    assert any("out of memory" in n for n in model.info.extra["notes"])
    assert any("out of memory" in n for n in vol.notes)


# ------------------------------------------------------------------------------------------------------------
# Real CT end to end (random weights)
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_ct():
    vol = CTVolume.from_image(sitk.ReadImage(str(shared_file("ct/covidctmd_p001_ct.nii.gz"))), name="p001")
    hu = vol.hu
    z, y, x = hu.shape
    central = np.zeros(hu.shape, bool)
    central[:, int(0.2 * y):int(0.8 * y), int(0.12 * x):int(0.88 * x)] = True
    lungs = ((hu < -400) & central).astype(np.uint8)  # crude: air-like voxels in the chest's central region
    return vol, lungs


@pytest.mark.parametrize("dims", [2, 3])
def test_real_ct_end_to_end(tmp_path, real_ct, dims):
    vol, lungs = real_ct
    torch.manual_seed(1)
    extra = {"slice_size": [64, 64]} if dims == 2 else {"spacing_zyx": [6.0, 6.0, 6.0], "patch_size": [16, 32, 32]}
    path = _checkpoint(tmp_path, f"test-pred-tiny{dims}d", _tiny(dims), dims,
                       intensity={"name": "mu_sigma", "mu": -500.0, "sigma": 500.0}, **extra)
    model = NetworkModel(path, device="cpu", batch_size=32 if dims == 2 else 2, margin_mm=0.0)
    prob = model.predict(vol, lungs)
    assert prob.shape == vol.shape and prob.dtype == np.float32
    assert np.isfinite(prob).all() and 0.0 <= prob.min() and prob.max() <= 1.0
    box = _box_mask(lungs > 0)
    assert not prob[~box].any()
    assert (prob[lungs > 0] > 0).mean() > 0.99


# ------------------------------------------------------------------------------------------------------------
# Every registered architecture (skips until the networks land)
# ------------------------------------------------------------------------------------------------------------

_REAL = sorted(a for a in registry.architectures() if not a.startswith("test-"))


@pytest.mark.parametrize("arch_id", _REAL or [pytest.param(None, marks=pytest.mark.skip(
    reason="no architectures registered yet (models/_load_all.py is empty)"))])
def test_registered_architecture_segments_a_real_ct(tmp_path, real_ct, arch_id):
    """Every registered network (tiny configuration, random weights) runs inside the engine's predictor on
    the real P001 CT and its result maps back onto the file's exact geometry."""
    arch = registry.architectures()[arch_id]
    args = dict(arch.tiny_args)
    dims = int(args.get("spatial_dims", arch.dims[0]))
    torch.manual_seed(0)
    net = registry.build({"arch": arch_id, "args": args})
    in_channels = int(args.get("in_channels", 1))
    out_channels = int(args.get("out_channels", 1))
    extra = {"slice_size": [32, 32]} if dims == 2 else {"spacing_zyx": [4.0, 4.0, 4.0], "patch_size": [16, 32, 32]}
    output = {"activation": "sigmoid"} if out_channels == 1 else {"activation": "softmax", "foreground_channel": 1}
    labels = {str(i): ("background" if i == 0 else f"class{i}") for i in range(max(out_channels, 2))}
    spec = _spec(dims, **extra)
    spec["in_channels"] = in_channels
    # The file round trip of every architecture is tested in Testing/models/test_checkpoint.py; here the
    # predictor takes the Checkpoint object directly.
    ckpt = Checkpoint(model_config={"arch": arch_id, "args": args}, input_spec=spec, labels=labels, output=output,
                      task="infection", model_id=arch_id, version="0", description="", provenance={},
                      state_dict=net.state_dict())
    model = NetworkModel(ckpt, device="cpu", margin_mm=0.0, batch_size=4)
    vol, lungs = real_ct
    lung_labels = lungs.copy()
    middle = vol.shape[0] // 2
    lung_labels[: middle - 4] = 0  # a few slices are enough to exercise the network on CPU
    lung_labels[middle + 4:] = 0
    prob = model.predict(vol, lung_labels)
    assert prob.shape == vol.shape and prob.dtype == np.float32
    assert np.isfinite(prob).all() and prob.min() >= 0.0 and prob.max() <= 1.0
    assert not prob[~_box_mask(lung_labels > 0)].any()
    assert prob[lung_labels > 0].max() > 0.0
    mask_image = vol.to_input_geometry((prob >= 0.5).astype(np.uint8))
    source = sitk.ReadImage(str(shared_file("ct/covidctmd_p001_ct.nii.gz")))
    assert Geometry.of(mask_image) == Geometry.of(source)


def test_a_checkpoint_s_postprocess_is_applied_by_the_predictor(tmp_path):
    """output.postprocess (postprocess.py) in the checkpoint: the predictor drops what it removes."""
    from COVIDLesionSegLib.models.checkpoint import CheckpointError

    hu = np.full((20, 40, 40), -850.0, dtype=np.float32)
    hu[5:10, 5:15, 5:15] = -300.0            # 500 voxels of 2 uL = 1 mL: a lesion
    hu[15, 30:32, 30:35] = -300.0            # 10 voxels = 0.02 mL: a speck
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((1.0, 1.0, 2.0))
    volume = CTVolume.from_image(image)
    lungs = np.ones(hu.shape, dtype=np.uint8)
    raw = NetworkInfectionModel(_checkpoint(tmp_path, "test-pred-linear2d", _linear(2), 2, name="raw"),
                                device="cpu").predict(volume, lungs) >= 0.5
    assert raw[15, 30:32, 30:35].all() and raw[5:10, 5:15, 5:15].all()     # the network marks both
    path = _checkpoint(tmp_path, "test-pred-linear2d", _linear(2), 2, name="pp",
                       output={"activation": "sigmoid", "postprocess": {"min_component_ml": 0.1}})
    model = NetworkInfectionModel(path, device="cpu")
    kept = model.predict(volume, lungs) >= model.info.threshold
    assert not kept[15].any() and np.array_equal(kept[5:10], raw[5:10])
    with pytest.raises(CheckpointError, match="postprocess"):
        _checkpoint(tmp_path, "test-pred-linear2d", _linear(2), 2, name="bad",
                    output={"activation": "sigmoid", "postprocess": {"min_component_ml": -1}})


def test_confirm_hu_threshold_keeps_the_threshold_s_components_the_network_marks(tmp_path):
    """confirm_hu_threshold: the output is the hu-threshold mask's components that the network touches,
    whole (also where the network scored them below its threshold); a component it does not touch goes."""
    from COVIDLesionSegLib.infection_hu import segment_infection_hu

    zz, yy, xx = np.mgrid[:24, :64, :64]
    hu = np.full((24, 64, 64), -850.0, dtype=np.float32)
    a = (zz - 12) ** 2 * 4 + (yy - 20) ** 2 + (xx - 20) ** 2 <= 64     # two 8 mm balls of ground glass
    b = (zz - 12) ** 2 * 4 + (yy - 44) ** 2 + (xx - 44) ** 2 <= 64
    hu[a | b] = -600.0                                                 # below the network's -500 HU
    core = (zz - 12) ** 2 * 4 + (yy - 20) ** 2 + (xx - 20) ** 2 <= 9
    hu[core] = -400.0                                                  # a denser core in a only
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((1.0, 1.0, 2.0))
    volume = CTVolume.from_image(image)
    lungs = np.ones(hu.shape, dtype=np.uint8)
    threshold_mask = segment_infection_hu(volume.hu, lungs, volume.spacing_zyx)
    assert threshold_mask[a].mean() > 0.5 and threshold_mask[b].mean() > 0.5     # the bands find both
    path = _checkpoint(tmp_path, "test-pred-linear2d", _linear(2), 2, name="confirm",
                       output={"activation": "sigmoid", "postprocess": {"confirm_hu_threshold": True}})
    model = NetworkInfectionModel(path, device="cpu")
    probs = model.predict(volume, lungs)
    kept = probs >= model.info.threshold
    assert np.array_equal(kept & a, threshold_mask & a)                # all of a, not just the marked core
    assert (kept & a).sum() > 3 * core.sum()
    assert not (kept & b).any()                                        # b: the network never marked it
    assert not kept[~(a | b)].any()


def test_slice_step_runs_every_second_lung_slice_and_interpolates_the_others(tmp_path):
    """The fast mode of a 2D infection network (``slice_step=2``): the slices it runs are those of a full run,
    the slices between them the linear interpolation of their neighbours."""
    path = _checkpoint(tmp_path, "test-pred-linear2d", _linear(2), 2)
    hu, labels, _ = _phantom()
    vol = _volume(hu)
    # Both with batches of one slice: oneDNN's kernels for other batch sizes round differently (1 ulp).
    full = NetworkModel(path, device="cpu", margin_mm=0.0, batch_size=1).predict(vol, labels)
    calls = []
    fast_model = NetworkModel(path, device="cpu", margin_mm=0.0, slice_step=2, batch_size=1)
    fast = fast_model.predict(vol, labels, progress=lambda f, m: calls.append(m))
    zs = np.flatnonzero((labels > 0).any(axis=(1, 2)))
    run = np.unique(np.append(zs[::2], zs[-1]))
    assert len(calls) == len(run) < len(zs)
    np.testing.assert_array_equal(fast[run], full[run])
    for z in np.setdiff1d(zs, run):
        np.testing.assert_allclose(fast[z], 0.5 * (full[z - 1] + full[z + 1]), atol=1e-6)
    with pytest.raises(ValueError, match="slice_step"):
        NetworkModel(path, device="cpu", slice_step=0)


@pytest.mark.parametrize("slice_step", [1, 2])
def test_confirm_and_grow_runs_only_the_slices_that_can_change_the_result(tmp_path, slice_step):
    """With confirm_hu_threshold + grow_mm the network runs only on lung slices within grow_mm (along z) of the
    Hounsfield-band mask (InfectionPostprocess.slices_that_matter), and the kept mask is the one a run over
    every lung slice gives (also in the fast mode, which interpolates skipped slices from run ones)."""
    zz, yy, xx = np.mgrid[:40, :48, :48]
    hu = np.full((40, 48, 48), -850.0, dtype=np.float32)
    lesion = (zz - 8) ** 2 * 6 + (yy - 20) ** 2 + (xx - 20) ** 2 <= 36    # near the bottom slices only
    hu[lesion] = -300.0
    hu[30:33, 30:36, 30:36] = -450.0        # network-dense, but a lone cube far from every HU-band component
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((1.0, 1.0, 2.5))
    volume = CTVolume.from_image(image)
    lungs = np.ones(hu.shape, dtype=np.uint8)
    path = _checkpoint(tmp_path, "test-pred-linear2d", _linear(2), 2, name="grown",
                       output={"activation": "sigmoid", "threshold": 0.5,
                               "postprocess": {"confirm_hu_threshold": True, "grow_mm": 5.0}})
    model = NetworkInfectionModel(path, device="cpu", batch_size=1, slice_step=slice_step, margin_mm=0.0)
    calls: list[str] = []
    kept = model.predict(volume, lungs, progress=lambda f, m: calls.append(m)) >= model.threshold
    from COVIDLesionSegLib.infection_hu import segment_infection_hu

    hu_mask = segment_infection_hu(volume.hu, lungs, volume.spacing_zyx)
    needed = model.postprocess.slices_that_matter(hu_mask, volume.spacing_zyx)
    assert 0 < needed.sum() < 20
    run_every = np.unique(np.append(np.arange(40)[::slice_step], 39))
    assert len(calls) < len(run_every)                      # fewer slices than a run over all of them
    everything = model._predict(volume, lungs > 0, None)     # all lung slices (the fast mode's own as well)
    reference = model.postprocess.apply((everything >= model.threshold) & (lungs > 0), volume.hu,
                                        volume.spacing_zyx, lungs)
    assert reference.any() and np.array_equal(kept, reference)


def test_cpu_precision_is_bfloat16_only_where_the_processor_has_it(tmp_path):
    """cpu_amp "auto" uses bfloat16 autocast only on processors with native bfloat16; None keeps float32; the
    case's model record says which ran; bfloat16 probabilities stay close to float32's."""
    from COVIDLesionSegLib.network_predictor import cpu_has_native_bfloat16
    from COVIDLesionSegLib.pipeline import _model_record

    path = _checkpoint(tmp_path, "test-pred-linear2d", _linear(2), 2)
    hu, labels, _ = _phantom()
    vol = _volume(hu)
    auto = NetworkModel(path, device="cpu")
    exact = NetworkModel(path, device="cpu", cpu_amp=None)
    half = NetworkModel(path, device="cpu", cpu_amp="bfloat16")
    assert auto.precision == ("bfloat16" if cpu_has_native_bfloat16() else "float32")
    assert exact.precision == "float32" and half.precision == "bfloat16"
    assert _model_record(exact)["precision"] == "float32" and exact.info.extra["precision"] == "float32"
    p32, p16 = exact.predict(vol, labels), half.predict(vol, labels)
    assert np.abs(p32 - p16).max() < 0.05 and not np.array_equal(p32, p16)
    with pytest.raises(ValueError, match="cpu_amp"):
        NetworkModel(path, device="cpu", cpu_amp="float16")


@pytest.mark.parametrize("slice_step, postprocess", [(1, None), (2, None), (1, {"confirm_hu_threshold": True,
                                                                                   "grow_mm": 5.0}),
                                                   (2, {"confirm_hu_threshold": True, "grow_mm": 5.0})])
def test_mask_output_is_the_thresholded_probabilities(tmp_path, slice_step, postprocess):
    """output="mask" (the pipeline's): the bool mask is exactly the probabilities at the threshold, in the
    fast mode too (skipped slices interpolated across batch boundaries: batches of 3 slices) and after the
    checkpoint's post-processing; no float32 volume is returned."""
    zz, yy, xx = np.mgrid[:40, :48, :48]
    hu = np.full((40, 48, 48), -850.0, dtype=np.float32)
    hu[(zz - 12) ** 2 * 6 + (yy - 20) ** 2 + (xx - 20) ** 2 <= 40] = -300.0   # an opacity the bands find
    hu[(zz - 14) ** 2 * 6 + (yy - 21) ** 2 + (xx - 24) ** 2 <= 60] -= 150.0    # with a fainter rim
    hu[30:33, 30:36, 30:36] = -450.0        # network-dense, far from every HU-band component
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((1.0, 1.0, 2.5))
    vol = CTVolume.from_image(image)
    labels = np.ones(hu.shape, dtype=np.uint8)
    output = {"activation": "sigmoid", "threshold": 0.5, **({"postprocess": postprocess} if postprocess else {})}
    path = _checkpoint(tmp_path, "test-pred-linear2d", _linear(2), 2, name=f"m{slice_step}", output=output)
    probs = NetworkModel(path, device="cpu", slice_step=slice_step, batch_size=3).predict(vol, labels)
    masked = NetworkModel(path, device="cpu", slice_step=slice_step, batch_size=3, output="mask")
    mask = masked.predict(vol, labels)
    assert mask.dtype == bool and 0 < mask.sum() < mask.size // 10
    np.testing.assert_array_equal(mask, probs >= 0.5)
    with pytest.raises(ValueError, match="output"):
        NetworkModel(path, device="cpu", output="logits")
