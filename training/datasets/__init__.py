"""Readers of the public data sets the papers use; each returns a list of :class:`Case` records.

==========================  =====================================  ==========================================
reader                      data set                               targets
==========================  =====================================  ==========================================
read_covid19ctseg           COVID-19-CT-Seg (Zenodo 3757476)       infection, lung, left_lung, right_lung
read_covid19ctseg2d         shared 2D COVID-19-CT-Seg slices       infection, lung
read_msd                    MSD Task06_Lung (and nnU-Net tasks)    lesion (or ``target=``)
read_structseg              StructSeg 2019 lung GTV                lesion
read_nsclc_effusion         NSCLC-Radiomics + PleThora effusion    effusion, [lung]
read_lidc                   LIDC-IDRI DICOM + reader XML           nodule (>= 2 of 4 readers)
read_mosmed                 MosMedData                             infection
read_medseg                 MedSeg (tr_im / tr_mask / rp_*)        lesion, infection, ggo, consolidation,
                                                                   effusion, lung
read_medseg100              shared medseg100 slices                same as MedSeg, no lung
read_covidctmd              COVID-CT-MD DICOM + slice/lobe labels  (slice labels in ``meta``)
read_shared_ct              shared real HU volumes (../shared)     nodule (LIDC-0001); slice labels
read_synthetic              synthetic-lesion HU volumes            infection (or ``target=``), [lung]
                            (``training.synthesis``)
==========================  =====================================  ==========================================

:func:`load_case` turns a case into MONAI-ready arrays; :func:`make_dataset` wraps items in a (cached)
MONAI dataset; :func:`slice_items` cuts loaded volumes into 2D items.
"""

from .base import (
                   NOT_HU,
                   WINDOWED_0_255,
                   Case,
                   DatasetError,
                   LabelRef,
                   hu_from_0_255,
                   load_case,
                   make_dataset,
                   read_volume,
                   slice_items,
)
from .covid19ctseg import BENCHMARK_TASK1_TRAIN, read_benchmark_split, read_covid19ctseg
from .covidctmd import read_covidctmd, read_shared_ct
from .ctseg2d import ctseg2d_arrays, read_covid19ctseg2d
from .lidc import LidcConsensus, parse_lidc_xml, rasterise_readers, read_lidc
from .medseg import read_medseg, read_medseg100
from .mosmed import read_mosmed
from .msd import read_msd
from .nsclc_effusion import read_nsclc_effusion
from .structseg import read_structseg
from .synthetic import read_synthetic

__all__ = [
    "BENCHMARK_TASK1_TRAIN", "Case", "DatasetError", "LabelRef", "LidcConsensus", "NOT_HU", "WINDOWED_0_255",
    "ctseg2d_arrays", "hu_from_0_255", "load_case", "make_dataset", "parse_lidc_xml", "rasterise_readers",
    "read_benchmark_split", "read_covid19ctseg", "read_covid19ctseg2d", "read_covidctmd", "read_lidc",
    "read_medseg", "read_medseg100", "read_mosmed", "read_msd", "read_nsclc_effusion", "read_shared_ct",
    "read_structseg", "read_synthetic", "read_volume", "slice_items",
]
