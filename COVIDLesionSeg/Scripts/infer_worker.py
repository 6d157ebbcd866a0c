#!/usr/bin/env python
"""COVIDLesionSeg segmentation worker: started by the Slicer module (``PythonSlicer infer_worker.py ...``).

Runs one segmentation in its own process so that Slicer stays responsive, and reports progress as JSON
lines on stdout. The protocol and the options are documented in ``COVIDLesionSegLib/worker.py``.
"""

import sys
from pathlib import Path

# The engine package sits beside this folder (source tree: COVIDLesionSeg/; installed extension:
# qt-scripted-modules/). PythonSlicer does not put module folders on sys.path by itself.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from COVIDLesionSegLib.worker import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
