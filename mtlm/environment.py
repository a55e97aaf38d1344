"""What a run was made with: the git commit of the mtlm source, library versions, Python, platform, CPU and
accelerator. `fit` writes it to run_dir/environment.json; MLflow tags and `mtlm report` read it."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

LIBRARIES = ("torch", "transformers", "accelerate", "tokenizers", "datasets", "scikit-learn", "peft",
             "onnxruntime", "mlflow-skinny", "mlflow", "matplotlib", "numpy")


def git_commit(folder: Path | None = None) -> dict | None:
    """{"commit": sha1, "dirty": bool} of the git checkout holding `folder` (default: the mtlm package), or
    None when it is not in a git checkout or git is missing."""
    folder = Path(folder) if folder is not None else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if sha.returncode != 0:
            return None
        status = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": sha.stdout.strip(), "dirty": bool(status.stdout.strip())}


def library_versions() -> dict[str, str]:
    """{distribution: version} of the installed LIBRARIES and mtlm itself (absent ones left out)."""
    out = {}
    for name in ("mtlm",) + LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def describe_environment() -> dict:
    """{"git", "python", "platform", "cpu", "cpu_count", "accelerator", "libraries"} of this process."""
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"git": git_commit(), "python": sys.version.split()[0], "platform": platform.platform(),
            "cpu": cpu, "cpu_count": os.cpu_count(),
            "accelerator": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "libraries": library_versions()}
