"""Artifacts: atomic writes (temp file + rename) that carry their provenance.

An interrupted job never leaves a half-written artifact behind: every file is written next to its
target and renamed into place. JSON artifacts embed a `provenance` record; CSV files are plain tables
whose provenance sits in the JSON summary written beside them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import subprocess
import tempfile
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


@contextlib.contextmanager
def atomic(path) -> Path:
    """Yield a temporary path beside `path`; on success it is renamed to `path`, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; artifacts are shared like any other file
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, data: dict) -> None:
    with atomic(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")


def write_csv(path, frame) -> None:
    with atomic(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")


def write_markdown(path, frame) -> None:
    """A table as Markdown (numbers to 4 significant digits), for reading in a browser or a README."""
    with atomic(path) as tmp:
        tmp.write_text(frame.to_markdown(index=False, floatfmt=".4g") + "\n")


def save_figure(fig, path) -> None:
    """PNG (for the README and the report) and PDF (for papers) of one matplotlib figure."""
    import matplotlib.pyplot as plt

    for suffix in (".png", ".pdf"):
        with atomic(Path(path).with_suffix(suffix)) as tmp:
            # no creation date in the PDF: the same data gives the same bytes
            metadata = {"CreationDate": None} if suffix == ".pdf" else {}
            fig.savefig(tmp, dpi=150, bbox_inches="tight", format=suffix[1:], metadata=metadata)
    plt.close(fig)


def git_sha() -> str:
    """The checkout's commit, with `-dirty` when it has uncommitted changes; `unknown` outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=True
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def installed_version(name: str) -> str:
    """The installed distribution's version; "not installed" when the code runs from a checkout on PYTHONPATH
    (a machine whose image we cannot install into must still write its records)."""
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def provenance(settings: dict, plan=None) -> dict:
    """Where an artifact came from: its settings (and their hash), plan, code and machine."""
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": settings,
        "settings_hash": settings_hash(settings),
        "plan": str(plan) if plan else None,
        "git": git_sha(),
        "versions": {name: installed_version(name) for name in ("cqil", "torch", "transformers", "peft")},
        "machine": machine(),
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _gpu_driver() -> str:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()[0]
    return "unknown"


def machine() -> dict:
    """The host: CPU model and cores, torch version, and the GPU torch sees (name, count, driver, CUDA)."""
    import torch

    info = {
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info |= {
            "gpu": torch.cuda.get_device_name(),
            "gpus": torch.cuda.device_count(),
            "driver": _gpu_driver(),
            "cuda": torch.version.cuda,
        }
    return info
