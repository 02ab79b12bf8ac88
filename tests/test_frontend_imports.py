"""The front end only validates, admits and forwards: it must start without torch, transformers or diffusers, so
that its process stays small and a slim front-end install or image can leave them out."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "transformers", "diffusers", "onnxruntime")


def test_the_front_end_imports_no_model_library() -> None:
    probe = f"import sys, serving.frontend.server; print([m for m in {HEAVY!r} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
