"""COVIDLesionSeg engine: lung and COVID-19 infection segmentation of chest CT.

Qt-free and importable without Slicer. The Slicer module (``COVIDLesionSeg.py``), the command line
(``cli.py``) and the training package (``training/``) all build on this package.

Layout (one implementation of each thing; the README's "Layout" lists every file in data-flow order and
says which change belongs where):

- ``errors``        every user-facing error and ``user_message``, the one translator to the user's message
- ``volume``        CTVolume: a CT in canonical LPS orientation plus the way back to the input's geometry
- ``io``            reading NIfTI/NRRD/MHA/DICOM series
- ``checks``        input validation (3D, Hounsfield units, not pre-windowed, size) and ``load_volume``, the one
                    path read -> check -> CTVolume
- ``lungs``         right/left lung masking without trained weights
- ``infection_hu``  the non-learned Hounsfield-band infection baseline
- ``predictor``     the predictor interface every infection/lung model implements, and model loading
- ``quantify``      volumes and infected percentages per lung and per zone
- ``metrics``       DSC, NSD, sensitivity, ... (used by evaluation, training and benchmarks)
- ``outputs``       ``.seg.nrrd``, labelmap, JSON report, ``results.csv``, atomic writing
- ``pipeline``      read -> check -> lungs -> infection -> quantify -> write, with timings and progress
- ``cli``           the ``covidlesionseg`` command
- ``catalogue``, ``dependencies``   models by id; the Python packages a model needs
- ``mrml``, ``slicer_logic``, ``worker``   the Slicer adapter, the module's Qt-free logic, the background process
- ``models/``       the papers' networks, losses, architecture registry, checkpoint format and citations
"""

__version__ = "0.1.0"

# Label convention of every labelmap file and array (README, "Outputs").
LABEL_BACKGROUND = 0
LABEL_RIGHT_LUNG = 1
LABEL_LEFT_LUNG = 2
LABEL_INFECTION = 3
