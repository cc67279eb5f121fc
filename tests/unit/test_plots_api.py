"""Plots go through matplotlib's object API: importing or plotting never changes the user's backend."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[2]

PLOTTING_MODULES = (
    "kensa.flows.sweep_plots",
    "kensa.models.evaluation.plots",
    "kensa.models.evaluation.compare_onnx",
    "kensa.models.evaluation.side_by_side",
    "kensa.models.line.samples",
    "bench.drift",
)

# A user's session: they chose a backend, then use kensa (import every plotting module, plot).
_SESSION = """
import importlib, json, sys
from pathlib import Path
import matplotlib
matplotlib.use("svg")
for name in sys.argv[2:]:
    importlib.import_module(name)
after_import = matplotlib.get_backend()
from kensa.models.evaluation.plots import plot_confusion
from kensa.models.evaluation.side_by_side import HEADLINE, plot_side_by_side
from kensa.models.line.samples import save_sample_sheets
out = Path(sys.argv[1])
plot_confusion([[5, 1, 0], [0, 4, 2], [1, 0, 6]], ["ok", "defect_scratch", "defect_dent"], out / "cm.png")
rates = {m: 0.25 for m in HEADLINE}
plot_side_by_side({"test": {"n": 3, "models": {"a": rates, "b": rates}}}, out / "side.png")
save_sample_sheets(out / "samples", image_size=64, per_class=1)
print(json.dumps({"after_import": after_import, "after_plots": matplotlib.get_backend(),
                  "pyplot": "matplotlib.pyplot" in sys.modules}))
"""


def test_kensa_leaves_the_users_backend_alone_and_writes_real_pngs(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _SESSION, str(tmp_path), *PLOTTING_MODULES],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"after_import": "svg", "after_plots": "svg", "pyplot": False}

    cm = tmp_path / "cm.png"
    assert cm.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(cm) as image:
        image.verify()
    with Image.open(cm) as image:
        assert image.format == "PNG" and image.size == (616, 495)  # figsize (5.6, 4.5) at 110 dpi
        assert len(set(image.convert("L").getdata())) > 2  # something was drawn
    for other in (tmp_path / "side.png", tmp_path / "samples" / "samples_by_class.png"):
        with Image.open(other) as image:
            assert image.format == "PNG"
