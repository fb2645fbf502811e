"""Model sources (built-in name, local folder, hub id, GGUF file) and loading with a per-session cache.

``resolve`` turns what the user wrote into a ModelSpec, or one ModelError that says why it is none of
the sources; it runs at configure time so that a bad name ends the session once, quickly. A GGUF file (or a
built-in trained model, which is one) is checked and converted there, once (gguf.py), and then loads as a folder.
``ModelStore`` loads each (model, dtype, quantization, device) once per session and switches the
attention implementation in place; a model that fails to load fails every test that needs it with
the same message, without trying again.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import hashlib
import re
import socket
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..common.phases import timed
from . import gguf, zoo

HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
HUB_CONNECT_TIMEOUT_S = 5.0


class ModelError(Exception):
    """A model reference that cannot be used; the message is the whole story."""


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model reference. ``name`` is the short label used in test ids and reports."""

    ref: str
    kind: str  # "builtin" | "local" | "hub" | "gguf"
    folder: str | None = None  # "gguf": the transformers folder the file was converted to
    digest: str | None = None  # a folder's or GGUF file's config.json, hashed: see baseline_name
    label: str | None = None  # the name the session gives it where two models' names would be the same

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        return Path(self.ref).name if self.kind in ("local", "gguf") else self.ref

    @property
    def baseline_name(self) -> str:
        """The model's key in the baseline files: for a folder or GGUF file its name and the digest of its config, so
        two checkpoints of one name (two folders called "final") never judge each other."""
        return f"{self.name}-{self.digest}" if self.digest else self.name

    @property
    def source(self) -> str:
        """What from_pretrained reads (not for "builtin", which is built from its config)."""
        return self.folder or self.ref


BUILTIN_NAMES = (*zoo.BUILTIN_NAMES, *gguf.PACKAGED)


def resolve(ref: str, role: str = "--llmopt-model") -> ModelSpec:
    """Decide what ``ref`` is: a built-in name, a local folder, a GGUF file (or a folder holding one), or a hub id
    that can be fetched."""
    if zoo.is_builtin(ref):
        return ModelSpec(ref, "builtin")
    path = Path(ref).expanduser()
    try:
        if ref in gguf.PACKAGED:
            return _gguf_spec(ref, gguf.packaged_file(ref), ref)
        if path.is_file():
            if path.suffix.lower() != ".gguf" and not gguf.has_magic(path):
                raise ModelError(f"{role}={ref}: a file, and not a GGUF file; a model is a folder with a config.json, a .gguf file, a built-in name or a hub id")
            return _gguf_spec(str(path.resolve()), path.resolve())
        if path.is_dir():
            if (path / "config.json").is_file():
                return ModelSpec(str(path.resolve()), "local", digest=config_digest(path))
            found = sorted(path.glob("*.gguf"))
            if len(found) == 1:
                return _gguf_spec(str(found[0].resolve()), found[0].resolve())
            if found:
                raise ModelError(f"{role}={ref}: the folder holds {len(found)} GGUF files ({', '.join(f.name for f in found)}): name one, e.g. {role}={found[0]}")
            raise ModelError(f"{role}={ref}: the folder {path.resolve()} has no config.json and no .gguf file, so it is not a model folder")
    except gguf.GgufError as exc:
        raise ModelError(f"{role}={ref}: {str(exc).removeprefix(f'{ref}: ')}") from None
    if ref.startswith((".", "/", "~")) or not HUB_ID_RE.match(ref) or path.suffix.lower() == ".gguf":
        raise ModelError(f"{role}={ref}: no such folder or file ({path.resolve()}), and not a built-in model ({', '.join(BUILTIN_NAMES)})")
    _check_hub(ref, role)
    return ModelSpec(ref, "hub")


def _gguf_spec(ref: str, file: Path, packaged: str | None = None) -> ModelSpec:
    """A GGUF file checked and converted (once; later sessions find the folder in the cache)."""
    header = gguf.inspect(file)
    folder = gguf.converted(file, header, packaged)
    return ModelSpec(ref, "gguf", str(folder), None if packaged else config_digest(Path(folder)))


def config_digest(folder: Path) -> str | None:
    """Eight hex digits of the folder's config.json (None where it cannot be read)."""
    try:
        return hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()[:8]
    except OSError:
        return None


def distinct(specs: tuple[ModelSpec, ...]) -> tuple[ModelSpec, ...]:
    """Models whose names would be the same (two folders called "final") named by their parent folder too
    ("run1/final", "run2/final"), so their test ids, report rows and baselines stay apart."""
    count: dict[str, int] = {}
    for spec in specs:
        count[spec.name] = count.get(spec.name, 0) + 1
    out = []
    for spec in specs:
        if count[spec.name] > 1 and spec.kind in ("local", "gguf"):
            path = Path(spec.ref)
            spec = dataclasses.replace(spec, label=f"{path.parent.name}/{path.name}")
        out.append(spec)
    return tuple(out)


def origin(spec: ModelSpec, dtype: str) -> str | None:
    """Where a model's weights came from, when that is not plain (a GGUF file, dequantized to ``dtype``)."""
    return gguf.describe(spec.folder, dtype) if spec.kind == "gguf" and spec.folder else None


def _check_hub(repo: str, role: str) -> None:
    """Make sure a hub id can be loaded: from the local cache, or from a reachable hub where it exists."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    not_local = f"{role}={repo}: not a built-in model ({', '.join(BUILTIN_NAMES)}) and no such local folder"
    cached = try_to_load_from_cache(repo, "config.json")
    if isinstance(cached, str):
        return
    if constants.HF_HUB_OFFLINE:
        raise ModelError(f"{not_local}; as a hub id it is not in the local cache and HF_HUB_OFFLINE is set")
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=HUB_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ModelError(
            f"{not_local}; as a hub id it is not in the local cache, and the hub at {constants.ENDPOINT} "
            f"cannot be reached ({exc}). Download it where the hub is reachable, or pass a local folder."
        ) from None
    try:
        hf_hub_download(repo, "config.json")
    except Exception as exc:  # the hub's errors moved between huggingface_hub releases; name them by class
        kind = type(exc).__name__
        hint = {
            "RepositoryNotFoundError": "no such model on the hub (if it is private, log in: `hf auth login` or HF_TOKEN)",
            "GatedRepoError": "the model is gated: accept its license on the hub and log in",
            "EntryNotFoundError": "the repository has no config.json, so it is not a transformers model",
            "RemoteEntryNotFoundError": "the repository has no config.json, so it is not a transformers model",
        }.get(kind, f"{kind}: {str(exc).splitlines()[0] if str(exc) else ''}")
        raise ModelError(f"{not_local}; as a hub id: {hint}") from None


@dataclass(frozen=True)
class ModelInfo:
    """What is known about a model without loading its weights."""

    spec: ModelSpec
    config: Any
    cls: type | None
    capabilities: dict[str, bool]

    @property
    def class_name(self) -> str:
        return self.cls.__name__ if self.cls else type(self.config).__name__

    @property
    def default_attention(self) -> str:
        """The attention from_pretrained picks when none is asked for: SDPA where the class declares it,
        unless the class turns it down for eager (4.46-4.47 Gemma2: "SDPA reduces the model performance")."""
        if not self.capabilities.get("sdpa", True):
            return "eager"
        return "eager" if self.cls is not None and _prefers_eager(self.cls) else "sdpa"

    @property
    def max_positions(self) -> int | None:
        text = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(text, key, None)
            if isinstance(value, int):
                return value
        return None


def _prefers_eager(cls: type) -> bool:
    """Whether a model class overrides ``_check_and_enable_sdpa`` to swap an unasked-for SDPA for eager."""
    import inspect

    for klass in cls.__mro__:
        method = klass.__dict__.get("_check_and_enable_sdpa")
        if method is None or klass.__module__.startswith("transformers.modeling_utils"):
            continue
        try:
            source = inspect.getsource(getattr(method, "__func__", method))
        except (OSError, TypeError):
            continue
        if '_attn_implementation = "eager"' in source:
            return True
    return False


@functools.cache
def describe(spec: ModelSpec, trust_remote_code: bool) -> ModelInfo:
    """Config, class and declared capabilities of a model (reads config.json only)."""
    from transformers import AutoConfig

    from . import compat

    if spec.kind == "builtin":
        config = zoo.builtin_config(spec.ref)
    else:
        config = AutoConfig.from_pretrained(spec.source, trust_remote_code=trust_remote_code)
    cls = compat.model_class(config, trust_remote_code)
    caps = compat.capabilities(cls) if cls else {name: True for name in compat.CAPABILITIES}
    return ModelInfo(spec, config, cls, caps)


@dataclass
class Loaded:
    """A model ready to run, with its tokenizer."""

    spec: ModelSpec
    model: Any
    tokenizer: Any
    quant: str
    attention: str

    @property
    def device(self) -> Any:
        return self.model.device


class LoadError(Exception):
    """A model that could not be loaded; tests that need it fail with this message."""


class ModelStore:
    """Loads each (model, dtype, quantization, device) once per session; keeps the last few alive."""

    def __init__(self, device: str, dtype: str, seed: int, trust_remote_code: bool, keep: int = 3) -> None:
        self.device = device
        self.dtype = dtype
        self.seed = seed
        self.trust_remote_code = trust_remote_code
        self.keep = keep
        self._models: OrderedDict[tuple[str, str, str], Loaded] = OrderedDict()
        self._failures: dict[tuple[str, str, str], str] = {}
        self._fixed_attention: set[tuple[str, str]] = set()  # (model, quant) whose attention cannot be switched
        self._tokenizers: dict[str, Any] = {}

    def describe(self, spec: ModelSpec) -> ModelInfo:
        return describe(spec, self.trust_remote_code)

    @timed("load")
    def tokenizer(self, spec: ModelSpec) -> Any:
        if spec.ref not in self._tokenizers:
            self._tokenizers[spec.ref] = load_tokenizer(spec, self.trust_remote_code)
        return self._tokenizers[spec.ref]

    @timed("load")
    def load(self, spec: ModelSpec, attention: str, quant: str = "none") -> Loaded:
        """The model with ``attention`` set; loads it (or reloads it, where it cannot switch) if needed."""
        from . import compat

        switch = self._can_switch() and (spec.ref, quant) not in self._fixed_attention
        key = (spec.ref, quant, "*" if switch else attention)
        if key in self._failures:
            raise LoadError(self._failures[key] + " (failed earlier in this session)")
        loaded = self._models.get(key)
        if loaded is None:
            loaded = self._load(spec, attention, quant, key)
        self._models.move_to_end(key)
        if loaded.attention != attention and not compat.set_attention(loaded.model, attention):
            if not switch:
                raise LoadError(f"{spec.name}: could not switch attention to {attention}")
            # A class without the attention interface keeps the implementation it was built with (5.10's GPT-Neo
            # refuses to switch): from now on it is loaded once per implementation.
            self._fixed_attention.add((spec.ref, quant))
            self._models[(spec.ref, quant, loaded.attention)] = self._models.pop(key)  # kept, under what it runs
            return self.load(spec, attention, quant)
        loaded.attention = attention
        return loaded

    @staticmethod
    def _can_switch() -> bool:
        from . import compat

        return compat.can_switch_attention()

    def _load(self, spec: ModelSpec, attention: str, quant: str, key: tuple[str, str, str]) -> Loaded:
        import torch

        from . import compat, quantize

        while len(self._models) >= self.keep:
            self._models.popitem(last=False)
            release_memory()
        dtype = getattr(torch, self.dtype)
        try:
            if spec.kind == "builtin" and quant == "none":
                model = zoo.build_builtin(spec.ref, self.seed, dtype, self.device, compat.from_config, attention)
            else:
                source = spec.source if spec.kind != "builtin" else _saved_builtin(spec.ref, self.seed, self.dtype, self.device)
                quant_config = quantize.bnb_config(quant, dtype) if quant != "none" else None
                model = compat.from_pretrained(source, dtype, self.device, attention, quant_config, self.trust_remote_code)
                model = model.eval()
                if quant == "none" and self.device == "cpu":
                    model = model.to(self.device)
            if not compat.set_attention(model, attention):
                raise LoadError(f"{spec.name}: attention implementation {attention} could not be set")
        except torch.cuda.OutOfMemoryError as exc:
            message = f"{spec.name}: out of GPU memory while loading ({quant}, {self.dtype}): {str(exc).splitlines()[0]}"
            self._failures[key] = message
            release_memory()
            raise LoadError(message) from None
        except LoadError as exc:
            self._failures[key] = str(exc)
            raise
        except Exception as exc:
            message = f"{spec.name}: could not load ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            self._failures[key] = message
            raise LoadError(message) from exc
        loaded = Loaded(spec, model, self.tokenizer(spec), quant, attention)
        self._models[key] = loaded
        return loaded


def load_tokenizer(spec: ModelSpec, trust_remote_code: bool) -> Any:
    """The model's tokenizer, set for batched generation: left padding and a pad token."""
    if spec.kind == "builtin":
        return zoo.builtin_tokenizer(spec.ref)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec.source, trust_remote_code=trust_remote_code)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    return tok


@functools.cache
def _saved_builtin(name: str, seed: int, dtype: str = "float32", device: str = "cpu") -> str:
    """A built-in model written to a temporary folder, for loaders that need from_pretrained (bnb).

    Full-size shapes are drawn where the session draws them (``device``, ``dtype``), so the checkpoint
    holds the very weights of the unquantized model of the session, and a 7B shape is not initialized
    on the CPU in float32 (minutes); tiny models are drawn on the CPU in float32, as build_builtin does.
    """
    import tempfile

    import torch

    from . import compat

    folder = Path(tempfile.mkdtemp(prefix=f"llmopt-{name}-"))
    dtype_on, device_on = (getattr(torch, dtype), device) if name in zoo.SHAPES else (torch.float32, "cpu")
    model = zoo.build_builtin(name, seed, dtype_on, device_on, compat.from_config)
    model.save_pretrained(folder)
    del model
    release_memory()
    zoo.builtin_tokenizer(name).save_pretrained(folder)
    return str(folder)


def release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
