"""What the package needs at run time: the library imports without the example app's dependencies."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_library_imports_without_the_apps_extra():
    # hydra (and scikit-learn, for the digits data) belong to the `app` extra: the library must not need them.
    code = (
        "import sys\n"
        "for name in ('hydra', 'omegaconf', 'sklearn'):\n"
        "    sys.modules[name] = None  # any import of them fails\n"
        "import lightning_draco, lightning_draco.heterogeneous\n"
        "print(sorted(lightning_draco.__all__)[:1])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
