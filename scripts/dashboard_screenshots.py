#!/usr/bin/env python3
"""README's screenshots of the dashboard, made by its browser test on the bundled model (Debian's
Chromium through playwright: ./scripts/setup --for-tests): the test writes them into `--out`.

    .venv/bin/python scripts/dashboard_screenshots.py [--out docs/images]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST = "tests/test_dashboard.py::test_on_the_bundled_model_a_fine_tune_from_the_form_reaches_success_live"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args()
    env = {**os.environ, "MLX_LORA_API_SCREENSHOTS": str(args.out.resolve())}
    sys.exit(subprocess.call([sys.executable, "-m", "pytest", "-q", TEST], cwd=ROOT, env=env))


if __name__ == "__main__":
    main()
