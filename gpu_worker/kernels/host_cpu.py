"""What identifies this machine's CPU, for caches of what was measured or compiled on it."""
from __future__ import annotations

import hashlib
import platform


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo (else what `platform` knows)."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_flags_hash() -> str:
    """A short hash of the CPU's feature flags: VMs often name very different CPUs alike ("AMD EPYC")."""
    flags = " ".join(sorted(_cpuinfo_field("flags").split()))
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


def _cpuinfo_field(name: str) -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == name:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""
