"""Dataset readers: each on small files generated in its exact layout, and on ../shared/data where it applies."""

from __future__ import annotations

import csv
import json
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from Testing.conftest import shared_file
from training.datasets import (
    WINDOWED_0_255,
    DatasetError,
    LidcConsensus,
    load_case,
    parse_lidc_xml,
    read_benchmark_split,
    read_covid19ctseg,
    read_covid19ctseg2d,
    read_covidctmd,
    read_lidc,
    read_medseg,
    read_medseg100,
    read_mosmed,
    read_msd,
    read_nsclc_effusion,
    read_shared_ct,
    read_structseg,
    slice_items,
)
from training.datasets.covid19ctseg import case_id_from_name, group_of

SPACING = (0.8, 0.8, 2.5)  # x, y, z (SimpleITK order)


def write_nifti(path: Path, array_zyx: np.ndarray, spacing=SPACING, direction=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(array_zyx)
    img.SetSpacing(spacing)
    if direction is not None:
        img.SetDirection(direction)
    sitk.WriteImage(img, str(path))
    return path


def blob_volume(shape=(6, 16, 16), value=200, background=-800):
    """A CT-like volume with a 2x4x4 bright cube and its mask."""
    img = np.full(shape, background, np.int16)
    mask = np.zeros(shape, np.uint8)
    img[2:4, 5:9, 6:10] = value
    mask[2:4, 5:9, 6:10] = 1
    return img, mask


# ----------------------------------------------------------------------------------------------------------
# COVID-19-CT-Seg
# ----------------------------------------------------------------------------------------------------------

def make_covid19ctseg(root: Path) -> None:
    img, mask = blob_volume()
    lung = np.zeros_like(mask)
    lung[:, :, :8] = 1   # value 1 on one half, 2 on the other (the data set's two lungs)
    lung[:, :, 8:] = 2
    names = {"coronacases_org_001.nii.gz": "coronacases_001",
             "radiopaedia_org_covid-19-pneumonia-10_85902_1-dcm.nii.gz": "radiopaedia_10_85902_1",
             "radiopaedia_org_covid-19-pneumonia-10_85902_3-dcm.nii.gz": "radiopaedia_10_85902_3"}
    for image_name, cid in names.items():
        vol = img if cid.startswith("corona") else np.where(mask > 0, 255, 20).astype(np.int16)  # 0..255 data
        write_nifti(root / "COVID-19-CT-Seg_20cases" / image_name, vol)
        write_nifti(root / "Infection_Mask" / f"{cid}.nii.gz", mask)
        write_nifti(root / "Lung_Mask" / f"{cid}.nii.gz", lung)


def test_covid19ctseg_layout(tmp_path):
    make_covid19ctseg(tmp_path)
    cases = read_covid19ctseg(tmp_path)
    by_id = {c.id: c for c in cases}
    assert set(by_id) == {"coronacases_001", "radiopaedia_10_85902_1", "radiopaedia_10_85902_3"}
    # one Radiopaedia patient with two volumes: one group
    assert by_id["radiopaedia_10_85902_1"].group == by_id["radiopaedia_10_85902_3"].group == "radiopaedia_10"
    assert by_id["coronacases_001"].group == "coronacases_001"
    assert WINDOWED_0_255 in by_id["radiopaedia_10_85902_1"].notes
    assert WINDOWED_0_255 not in by_id["coronacases_001"].notes
    d = load_case(by_id["coronacases_001"], ["infection", "lung", "left_lung", "right_lung"])
    assert d["image"].shape == (1, 6, 16, 16) and d["image"].dtype == np.float32
    assert d["infection"].dtype == np.uint8 and set(np.unique(d["infection"])) == {0, 1}
    assert d["infection"].sum() == 2 * 4 * 4
    assert d["lung"].all()
    assert d["left_lung"].sum() + d["right_lung"].sum() == d["lung"].sum()
    assert d["spacing"] == pytest.approx((2.5, 0.8, 0.8))
    assert np.all(d["image"][d["infection"] > 0] == 200)
    # Radiopaedia: 0..255 back to approximate HU over the window [-1250, 250]
    r = load_case(by_id["radiopaedia_10_85902_1"], ["infection"])
    assert np.allclose(r["image"][r["infection"] > 0], 250.0)
    assert np.allclose(r["image"][r["infection"] == 0], 20 * 1500 / 255 - 1250, atol=1e-3)
    raw = load_case(by_id["radiopaedia_10_85902_1"], ["infection"], restore_hu=False)
    assert raw["image"].max() == 255


def test_covid19ctseg_names_and_errors(tmp_path):
    assert case_id_from_name("coronacases_org_001.nii.gz") == "coronacases_001"
    assert case_id_from_name("coronacases_org_case007.nii") == "coronacases_007"
    assert case_id_from_name("radiopaedia_org_covid-19-pneumonia-4_85506_1-dcm.nii.gz") == "radiopaedia_4_85506_1"
    assert group_of("radiopaedia_29_86491_1") == "radiopaedia_29"
    with pytest.raises(DatasetError, match="COVID-19-CT-Seg_20cases"):
        read_covid19ctseg(tmp_path)
    make_covid19ctseg(tmp_path)
    (tmp_path / "Infection_Mask" / "coronacases_001.nii.gz").unlink()
    with pytest.raises(DatasetError, match="no infection mask for coronacases_org_001"):
        read_covid19ctseg(tmp_path)


def test_label_on_another_grid_is_rejected(tmp_path):
    make_covid19ctseg(tmp_path)
    write_nifti(tmp_path / "Infection_Mask" / "coronacases_001.nii.gz", np.zeros((6, 16, 15), np.uint8))
    case = next(c for c in read_covid19ctseg(tmp_path) if c.id == "coronacases_001")
    with pytest.raises(DatasetError, match="does not match the image"):
        load_case(case, ["infection"])


def test_loading_reorients_to_lps_and_keeps_labels_aligned(tmp_path):
    # The same scan stored in RAS-like order (x and y flipped by the direction matrix) must load as the
    # engine's canonical LPS array, with the mask still on the bright cube.
    img, mask = blob_volume()
    ras = (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)
    write_nifti(tmp_path / "COVID-19-CT-Seg_20cases" / "coronacases_org_002.nii.gz", img, direction=ras)
    write_nifti(tmp_path / "Infection_Mask" / "coronacases_002.nii.gz", mask, direction=ras)
    d = load_case(read_covid19ctseg(tmp_path)[0], ["infection"])
    assert np.array_equal(d["image"][0], img[:, ::-1, ::-1].astype(np.float32))
    assert np.all(d["image"][d["infection"] > 0] == 200) and d["infection"].sum() == mask.sum()


def benchmark_like_folds():
    return [OrderedDict(train=np.array(["coronacases_001", "radiopaedia_10_85902_1"]),
                        val=np.array(["coronacases_002", "radiopaedia_10_85902_3"])),
            OrderedDict(train=np.array(["coronacases_002", "radiopaedia_10_85902_3"]),
                        val=np.array(["coronacases_001", "radiopaedia_10_85902_1"]))]


def test_benchmark_split_formats(tmp_path):
    expected = [{"train": ["coronacases_001", "radiopaedia_10_85902_1"], "test": ["coronacases_002", "radiopaedia_10_85902_3"]},
                {"train": ["coronacases_002", "radiopaedia_10_85902_3"], "test": ["coronacases_001", "radiopaedia_10_85902_1"]}]
    pkl = tmp_path / "split.pkl"
    pkl.write_bytes(pickle.dumps(benchmark_like_folds()))
    assert read_benchmark_split(pkl) == expected
    js = tmp_path / "split.json"
    js.write_text(json.dumps([{"train": f["train"], "test": f["test"]} for f in expected]))
    assert read_benchmark_split(js) == expected
    cs = tmp_path / "split.csv"
    with cs.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["fold", "case", "subset"])
        for k, fold in enumerate(expected):
            w.writerows([[k, c, "train"] for c in fold["train"]] + [[k, c, "test"] for c in fold["test"]])
    assert read_benchmark_split(cs) == expected
    folder = tmp_path / "txt"
    folder.mkdir()
    for k, fold in enumerate(expected):
        (folder / f"fold{k}_train.txt").write_text("\n".join(fold["train"]) + "\n")
        (folder / f"fold{k}_test.txt").write_text("\n".join(fold["test"]) + "\n")
    assert read_benchmark_split(folder) == expected


def test_benchmark_split_rejects_code_and_garbage(tmp_path):
    class Evil:
        def __reduce__(self):
            import os
            return (os.getcwd, ())

    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps([Evil()]))
    with pytest.raises(DatasetError, match="malformed split file"):
        read_benchmark_split(bad)
    js = tmp_path / "bad.json"
    js.write_text(json.dumps([{"training": []}]))
    with pytest.raises(DatasetError, match="'train' and 'val'"):
        read_benchmark_split(js)
    with pytest.raises(DatasetError, match="split file not found"):
        read_benchmark_split(tmp_path / "nope.pkl")


# ----------------------------------------------------------------------------------------------------------
# MSD, StructSeg, NSCLC effusion, MosMedData
# ----------------------------------------------------------------------------------------------------------

def test_msd_task06(tmp_path):
    img, mask = blob_volume()
    entries = []
    for n in (1, 3):
        write_nifti(tmp_path / "imagesTr" / f"lung_{n:03d}.nii.gz", img)
        write_nifti(tmp_path / "labelsTr" / f"lung_{n:03d}.nii.gz", mask)
        entries.append({"image": f"./imagesTr/lung_{n:03d}.nii.gz", "label": f"./labelsTr/lung_{n:03d}.nii.gz"})
    (tmp_path / "imagesTr" / "._lung_001.nii.gz").write_bytes(b"\x00mac resource fork")
    with pytest.raises(DatasetError, match="dataset.json not found"):
        read_msd(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "cancer"},
                                                       "training": entries, "test": ["./imagesTs/lung_002.nii.gz"]}))
    cases = read_msd(tmp_path)
    assert [c.id for c in cases] == ["lung_001", "lung_003"] and cases[0].targets == ("lesion",)
    assert load_case(cases[1])["lesion"].sum() == mask.sum()
    entries.append({"image": "./imagesTr/lung_009.nii.gz", "label": "./labelsTr/lung_009.nii.gz"})
    (tmp_path / "dataset.json").write_text(json.dumps({"training": entries}))
    with pytest.raises(DatasetError, match="image of training entry 2"):
        read_msd(tmp_path)


def test_structseg(tmp_path):
    img, mask = blob_volume()
    for n in (10, 2, 1):
        write_nifti(tmp_path / str(n) / "data.nii.gz", img)
        write_nifti(tmp_path / str(n) / "label.nii.gz", mask)
    cases = read_structseg(tmp_path)
    assert [c.id for c in cases] == ["structseg_1", "structseg_2", "structseg_10"]
    assert load_case(cases[0])["lesion"].sum() == mask.sum()
    (tmp_path / "2" / "label.nii.gz").unlink()
    with pytest.raises(DatasetError, match="label of patient 2"):
        read_structseg(tmp_path)


def test_nsclc_effusion(tmp_path):
    img, mask = blob_volume()
    for pid in ("LUNG1-001", "LUNG1-002", "LUNG1-0010"):
        write_nifti(tmp_path / "images" / f"{pid}.nii.gz", img)
    write_nifti(tmp_path / "effusion" / "LUNG1-001_effusion_second_reviewer.nii.gz", np.zeros_like(mask))
    write_nifti(tmp_path / "effusion" / "LUNG1-001_effusion_first_reviewer.nii.gz", mask)
    write_nifti(tmp_path / "effusion" / "LUNG1-0010_effusion_first_reviewer.nii.gz", mask)
    cases = read_nsclc_effusion(tmp_path)
    assert [c.id for c in cases] == ["LUNG1-001", "LUNG1-0010"]  # LUNG1-002 has no effusion mask
    assert cases[0].labels["effusion"].source.name == "LUNG1-001_effusion_first_reviewer.nii.gz"
    assert load_case(cases[0])["effusion"].sum() == mask.sum()
    import shutil
    shutil.rmtree(tmp_path / "effusion")
    with pytest.raises(DatasetError, match="effusion mask folder not found"):
        read_nsclc_effusion(tmp_path)


def test_mosmed(tmp_path):
    img, mask = blob_volume()
    write_nifti(tmp_path / "studies" / "CT-1" / "study_0255.nii.gz", img)
    write_nifti(tmp_path / "studies" / "CT-1" / "study_0256.nii.gz", img)
    write_nifti(tmp_path / "studies" / "CT-0" / "study_0001.nii.gz", img)
    write_nifti(tmp_path / "masks" / "study_0255_mask.nii.gz", mask)
    write_nifti(tmp_path / "masks" / "study_0256_mask.nii.gz", mask)
    cases = read_mosmed(tmp_path)
    assert [c.id for c in cases] == ["study_0255", "study_0256"] and cases[0].meta["category"] == "CT-1"
    assert len(read_mosmed(tmp_path, with_unlabelled=True)) == 3
    assert load_case(cases[0])["infection"].sum() == mask.sum()
    write_nifti(tmp_path / "masks" / "study_0300_mask.nii.gz", mask)
    with pytest.raises(DatasetError, match="masks without a study file: study_0300"):
        read_mosmed(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# MedSeg
# ----------------------------------------------------------------------------------------------------------

def test_medseg_full_release(tmp_path):
    n = 5
    im = np.stack([np.full((8, 8), 10 * i, np.int16) for i in range(n)])       # slice i has value 10 i
    msk = np.zeros((n, 8, 8), np.uint8)
    msk[:, 0, 0], msk[:, 0, 1], msk[:, 0, 2] = 1, 2, 3                          # GGO, consolidation, effusion
    msk[3, 4:6, 4:6] = 1
    # the header stacks slices towards inferior: reorientation reverses them, the ids must not move
    flip_z = (1.0, 0, 0, 0, 1.0, 0, 0, 0, -1.0)
    write_nifti(tmp_path / "tr_im.nii.gz", im, direction=flip_z)
    write_nifti(tmp_path / "tr_mask.nii.gz", msk, direction=flip_z)
    write_nifti(tmp_path / "tr_lungmasks_updated.nii.gz", np.ones_like(msk), direction=flip_z)
    write_nifti(tmp_path / "rp_im" / "1.nii.gz", *blob_volume()[:1])
    write_nifti(tmp_path / "rp_msk" / "1.nii.gz", blob_volume()[1])
    cases = read_medseg(tmp_path)
    slices = [c for c in cases if c.dim == 2]
    assert len(slices) == n and len({c.group for c in slices}) == n   # no patient ids: a slice is a group
    d = load_case(slices[3], ["lesion", "infection", "effusion", "ggo", "lung"])
    assert d["image"].shape == (1, 8, 8) and np.all(d["image"] == 30)
    assert d["lesion"].sum() == 3 + 4 and d["infection"].sum() == 2 + 4 and d["effusion"].sum() == 1
    assert d["ggo"].sum() == 1 + 4 and d["lung"].all()
    rp = [c for c in cases if c.dim == 3]
    assert [c.id for c in rp] == ["medseg_rp_1"] and load_case(rp[0], ["lesion"])["lesion"].sum() == 32
    with pytest.raises(DatasetError, match="tr_mask.nii.gz not found"):
        (tmp_path / "tr_mask.nii.gz").unlink()
        read_medseg(tmp_path)


def test_medseg100_shared():
    folder = shared_file("medseg100").parent / "medseg100"
    cases = read_medseg100(folder)
    assert len(cases) == 100 and len({c.group for c in cases}) == 100
    rows = list(csv.DictReader((folder / "slices.csv").open()))
    for i in (0, 1, 99):
        d = load_case(cases[i], ["lesion", "ggo", "consolidation", "effusion"])
        assert d["image"].shape == (1, 512, 512)
        assert d["ggo"].sum() == int(rows[i]["n_px_ggo"])
        assert d["consolidation"].sum() == int(rows[i]["n_px_consolidation"])
        assert d["effusion"].sum() == int(rows[i]["n_px_effusion"])
        assert d["lesion"].sum() == d["ggo"].sum() + d["consolidation"].sum() + d["effusion"].sum()
    assert {c.meta["infnet_split"] for c in cases} == {"train", "test", "absent"}


def test_medseg100_missing(tmp_path):
    with pytest.raises(DatasetError, match="medseg100.npz not found"):
        read_medseg100(tmp_path)
    np.savez(tmp_path / "medseg100.npz", images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DatasetError, match="no 'masks' array"):
        read_medseg100(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# The shared 2D COVID-19-CT-Seg slices and real CT volumes
# ----------------------------------------------------------------------------------------------------------

def test_covid19ctseg2d_shared():
    folder = shared_file("covid19ctseg2d/covid19ctseg2d.npz").parent
    cases = read_covid19ctseg2d(folder)
    assert len(cases) == 1337
    groups = {c.group for c in cases}
    assert groups == {str(g) for g in list(range(8)) + list(range(10, 20))}
    for c in cases:
        assert c.meta["source_group"] == ("coronacases" if int(c.group) < 10 else "radiopaedia")
    raw = np.load(folder / "covid19ctseg2d.npz")
    for i in (0, 100, 1336):
        d = load_case(cases[i])
        assert d["image"].shape == (1, 256, 256) and d["image"].dtype == np.float32
        assert np.array_equal(d["image"][0], raw["images"][i].astype(np.float32))
        assert np.array_equal(d["infection"][0], raw["infection"][i] > 0)
        assert np.array_equal(d["lung"][0], raw["lung"][i] > 0)
        assert d["infection"].any()  # slices without infection were dropped by the data set's makers
        assert cases[i].group == str(int(raw["group"][i]))


def test_covid19ctseg2d_malformed(tmp_path):
    np.savez(tmp_path / "covid19ctseg2d.npz", images=np.zeros((3, 4, 4), np.uint8), lung=np.zeros((3, 4, 4)),
             infection=np.zeros((3, 4, 4)), group=np.zeros((2,)))
    with pytest.raises(DatasetError, match="inconsistent shapes"):
        read_covid19ctseg2d(tmp_path)


def test_shared_ct_volumes():
    folder = shared_file("ct/lidc_0001_ct.nii.gz").parent
    cases = {c.id: c for c in read_shared_ct(folder)}
    assert set(cases) == {"LIDC-IDRI-0001", "P001", "normal001"}
    details = json.loads((folder / "lidc_0001_nodules.json").read_text())
    lidc = load_case(cases["LIDC-IDRI-0001"], ["nodule"])
    assert lidc["image"].shape == (1, 133, 512, 512)
    assert int(lidc["nodule"].sum()) == details["consensus_voxels"]
    assert np.median(lidc["image"][lidc["nodule"] > 0]) > -500   # the mask sits on soft tissue, not air
    p001 = load_case(cases["P001"], [])
    assert p001["slice_infected"].shape == (148,) and int(p001["slice_infected"].sum()) == 80
    assert p001["slice_lobes"].shape == (148, 5)
    # a slice labelled infected has at least one infected lobe
    assert np.all(p001["slice_lobes"][p001["slice_infected"] > 0].any(axis=1))
    assert int(cases["normal001"].meta["slice_infected"].sum()) == 0
    items = slice_items(lidc, keys=("image", "nodule"), require_positive="nodule")
    assert len(items) == len(np.unique(np.nonzero(lidc["nodule"][0])[0]))
    assert all(it["nodule"].any() and it["image"].shape == (1, 512, 512) for it in items)


# ----------------------------------------------------------------------------------------------------------
# LIDC-IDRI: DICOM + reader XML
# ----------------------------------------------------------------------------------------------------------

Z0, DZ = -100.0, 2.5


def write_dicom_series(folder: Path, array_zyx: np.ndarray, patient="LIDC-IDRI-0001", series_uid="1.2.3.4.5") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(array_zyx.shape[0]):
        sl = sitk.GetImageFromArray(array_zyx[k].astype(np.int16))
        sl.SetSpacing((0.7, 0.7))
        tags = {"0008|0060": "CT", "0020|000e": series_uid, "0020|000d": "1.2.3.4", "0010|0020": patient,
                "0020|0032": f"-10\\-20\\{Z0 + DZ * k}", "0020|0037": "1\\0\\0\\0\\1\\0",
                "0020|0013": str(k + 1), "0008|0018": f"{series_uid}.{k + 1}", "0018|0050": str(DZ),
                "0008|0016": "1.2.840.10008.5.1.4.1.1.2"}
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{array_zyx.shape[0] - k:06d}.dcm"))  # file order != slice order
        writer.Execute(sl)
    return folder


def _roi(z, points, inclusion=True):
    edges = "".join(f"<edgeMap><xCoord>{x}</xCoord><yCoord>{y}</yCoord></edgeMap>" for x, y in points)
    return (f"<roi><imageZposition>{z}</imageZposition><imageSOP_UID>1.2</imageSOP_UID>"
            f"<inclusion>{'TRUE' if inclusion else 'FALSE'}</inclusion>{edges}</roi>")


def _square(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]


def lidc_xml(readers: list[list[str]]) -> str:
    sessions = "".join("<readingSession><annotationVersion>3.12</annotationVersion>" +
                       "".join(f"<unblindedReadNodule><noduleID>N{r}{i}</noduleID>{rois}</unblindedReadNodule>"
                               for i, rois in enumerate(nodules)) +
                       "<nonNodule><nonNoduleID>x</nonNoduleID><imageZposition>-100</imageZposition>"
                       "<locus><xCoord>1</xCoord><yCoord>1</yCoord></locus></nonNodule>"
                       "</readingSession>" for r, nodules in enumerate(readers))
    return ('<?xml version="1.0" encoding="UTF-8"?><LidcReadMessage xmlns="http://www.nih.gov" uid="1">'
            "<ResponseHeader><SeriesInstanceUid>1.2.3.4.5</SeriesInstanceUid></ResponseHeader>"
            f"{sessions}</LidcReadMessage>")


def make_lidc(root: Path) -> tuple[Path, np.ndarray]:
    """A 6-slice series with four readers; returns the series folder and the expected >= 2 consensus."""
    series = write_dicom_series(root / "LIDC-IDRI-0001" / "study" / "series", np.full((6, 20, 24), -900))
    z1, z2 = Z0 + DZ * 2, Z0 + DZ * 3
    reader_a = [_roi(z1, _square(5, 4, 12, 10)) + _roi(z2, _square(5, 4, 12, 10)) +
                _roi(z2, _square(7, 6, 9, 8), inclusion=False)]              # with a hole on slice 3
    reader_b = [_roi(z1, _square(8, 4, 15, 10))]                             # overlaps A on slice 2
    reader_c = [_roi(z2, _square(5, 4, 12, 10))]                             # agrees with A on slice 3
    reader_d = [_roi(z1, [(20, 15)])]                                        # a < 3 mm nodule: one point
    (series / "069.xml").write_text(lidc_xml([reader_a, reader_b, reader_c, reader_d]))
    counts = np.zeros((6, 20, 24), int)
    a = np.zeros_like(counts)
    a[2, 4:11, 5:13] = 1
    a[3, 4:11, 5:13] = 1
    a[3, 7, 8] = 0                                                           # interior of the hole
    b = np.zeros_like(counts)
    b[2, 4:11, 8:16] = 1
    c = np.zeros_like(counts)
    c[3, 4:11, 5:13] = 1
    counts = a + b + c
    return series, (counts >= 2).astype(np.uint8)


def test_lidc_xml_parsing(tmp_path):
    series, _ = make_lidc(tmp_path)
    uid, readers = parse_lidc_xml(series / "069.xml")
    assert uid == "1.2.3.4.5" and len(readers) == 4
    assert [len(r) for r in readers] == [1, 1, 1, 1]
    assert [n.small for r in readers for n in r] == [False, False, False, True]
    assert [roi.inclusion for roi in readers[0][0].rois] == [True, True, False]


def test_lidc_consensus_mask(tmp_path):
    series, expected = make_lidc(tmp_path)
    (series.parent / "cxr").mkdir()
    (series.parent / "cxr" / "x.xml").write_text('<IdriReadMessage xmlns="http://www.nih.gov"/>')  # skipped
    cases = read_lidc(tmp_path)
    assert [c.id for c in cases] == ["LIDC-IDRI-0001"] and cases[0].group == "LIDC-IDRI-0001"
    d = load_case(cases[0], ["nodule"])
    assert d["image"].shape == (1, 6, 20, 24)
    assert np.array_equal(d["nodule"][0], expected)
    # one reader is enough with min_readers=1; three readers agree nowhere
    count, _ = LidcConsensus(series / "069.xml", series).reader_count()
    assert count.max() == 2 and int((count >= 1).sum()) > int(expected.sum())
    three = LidcConsensus(series / "069.xml", series, min_readers=3).to_image()
    assert int(sitk.GetArrayFromImage(three).sum()) == 0


def test_lidc_errors(tmp_path):
    series, _ = make_lidc(tmp_path)
    (series / "069.xml").write_text(lidc_xml([[_roi(50.0, _square(1, 1, 5, 5))]]))
    case = read_lidc(tmp_path)[0]
    with pytest.raises(DatasetError, match="no slice of the series lies within"):
        load_case(case, ["nodule"])
    (series / "069.xml").write_text("<LidcReadMessage><unclosed>")
    with pytest.raises(DatasetError, match="not valid XML"):
        parse_lidc_xml(series / "069.xml")
    (tmp_path / "empty_root").mkdir()
    with pytest.raises(DatasetError, match="no CT series with a LidcReadMessage XML"):
        read_lidc(tmp_path / "empty_root")


# ----------------------------------------------------------------------------------------------------------
# COVID-CT-MD
# ----------------------------------------------------------------------------------------------------------

def test_covidctmd(tmp_path):
    write_dicom_series(tmp_path / "COVID-19 Cases" / "P001", np.full((6, 20, 24), -700), patient="P001")
    write_dicom_series(tmp_path / "Normal Cases" / "normal001", np.full((6, 20, 24), -700), patient="n1",
                       series_uid="1.2.3.4.6")
    (tmp_path / "Index.csv").write_text("Label Index,Diagnosis,Relative Path,Folder/ID\n0,COVID-19,./COVID-19/,P001\n")
    slices = np.zeros((1, 10), np.uint8)
    slices[0, [1, 2, 3]] = 1                     # padded to 10 slices, the scan has 6
    lobes = np.zeros((1, 10, 5), np.uint8)
    lobes[0, [1, 2, 3], 2] = 1                   # RLL
    np.save(tmp_path / "Slice-level-labels.npy", slices)
    np.save(tmp_path / "Lobe-level-labels.npy", lobes)
    cases = read_covidctmd(tmp_path)
    assert [c.id for c in cases] == ["P001"] and cases[0].meta["diagnosis"] == "COVID-19"
    d = load_case(cases[0], [])
    assert d["image"].shape == (1, 6, 20, 24)
    assert d["slice_infected"].tolist() == [0, 1, 1, 1, 0, 0] and d["slice_lobes"][:, 2].sum() == 3
    assert [c.id for c in read_covidctmd(tmp_path, labelled_only=False)] == ["P001", "normal001"]
    (tmp_path / "Index.csv").write_text("Label Index,Diagnosis,Relative Path,Folder/ID\n0,COVID-19,./COVID-19/,P999\n")
    with pytest.raises(DatasetError, match="no folder P999/"):
        read_covidctmd(tmp_path)
    (tmp_path / "Slice-level-labels.npy").unlink()
    with pytest.raises(DatasetError, match="Slice-level-labels.npy not found"):
        read_covidctmd(tmp_path)
