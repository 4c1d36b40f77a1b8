"""Where a result came from: package, commit, torch, device, host."""

from __future__ import annotations

import functools
import platform
import socket
import subprocess
from pathlib import Path

import torch

__all__ = ["package_version", "git_info", "device_name", "provenance"]


@functools.cache
def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("estbench")
    except Exception:  # not installed: running from a source tree
        from estbench import __version__

        return __version__


@functools.cache
def git_info() -> tuple[str, bool]:
    """(commit sha, dirty) of the source tree holding this package, or ('unknown', False)."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        return sha, bool(status)
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(device: str) -> dict[str, object]:
    sha, dirty = git_info()
    return {
        "package_version": package_version(),
        "git_sha": sha,
        "git_dirty": dirty,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "device_name": device_name(device),
        "host": socket.gethostname(),
        "python_version": platform.python_version(),
    }
