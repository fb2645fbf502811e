"""Every option of the plugin, and the one rule that resolves it: CLI > environment > ini file > default.

Each option exists three times: ``--llmopt-NAME`` on the command line, ``LLMOPT_NAME`` in the
environment and ``llmopt_name`` in the ini file (pytest.ini, pyproject.toml, tox.ini, setup.cfg).
Values are validated when pytest configures, and a bad value is reported once, naming where it came
from, as a usage error. This module imports neither torch nor transformers: it runs in every pytest
session of an environment where the plugin is installed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ..running.variants import Selection, parse_selection

DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
DTYPES = ("auto", "float32", "float16", "bfloat16")
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class Source:
    """Where a value came from, written the way the user wrote it, for error messages."""

    kind: str  # "cli" | "env" | "ini" | "default"
    where: str

    def describe(self, raw: object) -> str:
        if self.kind == "cli":
            values = raw if isinstance(raw, list) else [raw]
            return " ".join(f"{self.where}={value}" for value in values)
        if self.kind == "env":
            return f"environment variable {self.where}={raw!r}"
        if self.kind == "ini":
            return f"{self.where} = {raw}"
        return f"default {raw!r}"


@dataclass(frozen=True)
class OptionSpec:
    """One option: its three names, its help text, and the function that validates a raw value."""

    name: str
    help: str
    kind: str  # "str" | "list" | "bool"
    default: Any
    convert: Callable[[Any, Path], Any]
    metavar: str = ""

    @property
    def flag(self) -> str:
        return "--llmopt-" + self.name

    @property
    def env(self) -> str:
        return "LLMOPT_" + self.name.upper().replace("-", "_")

    @property
    def ini(self) -> str:
        return "llmopt_" + self.name.replace("-", "_")

    @property
    def dest(self) -> str:
        return "llmopt_" + self.name.replace("-", "_")


def _text(raw: Any, base: Path) -> str:
    return str(raw).strip()


def _optional_text(raw: Any, base: Path) -> str | None:
    text = str(raw).strip() if raw is not None else ""
    return text or None


def _model_list(raw: Any, base: Path) -> tuple[str, ...]:
    """Model references; relative folders are anchored where the value was written."""
    items = raw if isinstance(raw, (list, tuple)) else re.split(r"[,\s]+", str(raw))
    names = [str(item).strip() for item in items if str(item).strip()]
    if not names:
        raise ValueError("no model given")
    return tuple(_anchor_if_local(name, base) for name in names)


def _optional_model(raw: Any, base: Path) -> str | None:
    text = _optional_text(raw, base)
    return _anchor_if_local(text, base) if text else None


def _anchor_if_local(name: str, base: Path) -> str:
    candidate = Path(name).expanduser()
    if not candidate.is_absolute() and (base / candidate).is_dir():
        return str((base / candidate).resolve())
    return name


def _device(raw: Any, base: Path) -> str:
    text = str(raw).strip().lower()
    if not DEVICE_RE.match(text):
        raise ValueError("expected auto, cpu, cuda or cuda:N")
    return text


def _dtype(raw: Any, base: Path) -> str:
    text = DTYPE_ALIASES.get(str(raw).strip().lower(), str(raw).strip().lower())
    if text not in DTYPES:
        raise ValueError(f"expected one of {', '.join(DTYPES)}")
    return text


def _bool(raw: Any, base: Path) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise ValueError("expected true or false (1/0, yes/no, on/off)")


def _selection(raw: Any, base: Path) -> Selection:
    return parse_selection(str(raw))


def _existing_file(raw: Any, base: Path) -> Path | None:
    text = _optional_text(raw, base)
    if text is None:
        return None
    path = (base / Path(text).expanduser()).resolve()
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    return path


def _refusal_list(raw: Any, base: Path) -> tuple[Any, ...]:
    """Expected refusals, 'PACKAGE SPECIFIER: text' each (repeatable; ';' between them in the variable)."""
    from .expect import parse_refusal

    if raw is None:
        return ()
    items = raw if isinstance(raw, (list, tuple)) else str(raw).split(";")
    return tuple(parse_refusal(str(item)) for item in items if str(item).strip())


def _output_path(raw: Any, base: Path) -> Path | None:
    text = _optional_text(raw, base)
    if text is None:
        return None
    path = (base / Path(text).expanduser()).resolve()
    if path.suffix.lower() not in (".json", ".md", ".html"):
        raise ValueError("the report's extension must be .json, .md or .html")
    return path


def _directory(raw: Any, base: Path) -> Path | None:
    text = _optional_text(raw, base)
    if text is None:
        return None
    path = (base / Path(text).expanduser()).resolve()
    if path.exists() and not path.is_dir():
        raise ValueError(f"not a directory: {path}")
    return path


def _optional_seconds(raw: Any, base: Path) -> float | None:
    if raw is None or str(raw).strip() == "":
        return None
    try:
        value = float(str(raw).strip())
    except ValueError:
        raise ValueError("expected a number of seconds") from None
    if not 0 < value <= 3600:
        raise ValueError("expected seconds above 0 and at most 3600")
    return value


def _int_in(low: int, high: int) -> Callable[[Any, Path], int]:
    def convert(raw: Any, base: Path) -> int:
        try:
            value = int(str(raw).strip())
        except ValueError:
            raise ValueError("expected an integer") from None
        if not low <= value <= high:
            raise ValueError(f"expected an integer from {low} to {high}")
        return value

    return convert


OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec(
        "model",
        "model to validate: a hub id, a local folder or a built-in model name (repeatable; "
        "default: tiny-llama; built-in names: docs/models-and-options.md)",
        "list",
        ("tiny-llama",),
        _model_list,
        "MODEL",
    ),
    OptionSpec(
        "assistant",
        "assistant (draft) model for speculative decoding: hub id, local folder or built-in name",
        "str",
        None,
        _optional_model,
        "MODEL",
    ),
    OptionSpec("device", "auto | cpu | cuda | cuda:N (default: auto)", "str", "auto", _device, "DEVICE"),
    OptionSpec(
        "dtype",
        "auto | float32 | float16 | bfloat16 (default auto: float32 on CPU, bfloat16 on CUDA)",
        "str",
        "auto",
        _dtype,
        "DTYPE",
    ),
    OptionSpec(
        "variants",
        "select part of the variant matrix, e.g. 'attention=eager,sdpa cache=static quant!=nf4' "
        "(axes: cache, compile, attention, quant; terms are ANDed)",
        "str",
        "",
        _selection,
        "SELECTION",
    ),
    OptionSpec(
        "trust-remote-code",
        "allow models whose code lives on the hub (off unless given)",
        "bool",
        False,
        _bool,
    ),
    OptionSpec(
        "prompts",
        "prompts file (.txt: prompts separated by blank lines; .json/.jsonl: strings or "
        "{'text': ..., 'grounded': bool}); built-in prompts otherwise",
        "str",
        None,
        _existing_file,
        "PATH",
    ),
    OptionSpec("seed", "seed for built-in model weights and sampling tests (default 0)", "str", 0, _int_in(0, 2**31 - 1), "N"),
    OptionSpec(
        "new-tokens",
        "tokens generated per equivalence check (default 24)",
        "str",
        24,
        _int_in(1, 4096),
        "N",
    ),
    OptionSpec(
        "report",
        "write the compatibility report to PATH (.json, .md or .html)",
        "str",
        None,
        _output_path,
        "PATH",
    ),
    OptionSpec(
        "expect",
        "fail where a combination that ran in this earlier JSON report is now refused as unsupported (lost support)",
        "str",
        None,
        _existing_file,
        "REPORT",
    ),
    OptionSpec(
        "expected-refusal",
        "a refusal --llmopt-expect accepts: 'transformers>=5.0: text of its reason' (repeatable)",
        "list",
        (),
        _refusal_list,
        "REFUSAL",
    ),
    OptionSpec(
        "baselines",
        "directory of stored speed and memory baselines (<dir>/<hardware>/<model>.json; "
        "default: baselines/ in the rootdir)",
        "str",
        None,
        _directory,
        "DIR",
    ),
    OptionSpec(
        "update-baselines",
        "write the figures measured in this run into the baselines directory (off unless given)",
        "bool",
        False,
        _bool,
    ),
    OptionSpec(
        "speed-budget",
        "seconds of timed rounds per speed campaign (one per model and weights; warm-ups and compiles apart); "
        "default 100 on CUDA, 20 on CPU",
        "str",
        None,
        _optional_seconds,
        "SECONDS",
    ),
)


@dataclass(frozen=True)
class Settings:
    """The resolved, validated options of one session, with where each came from."""

    models: tuple[str, ...] = ("tiny-llama",)
    assistant: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    variants: Selection = field(default_factory=lambda: parse_selection(""))
    trust_remote_code: bool = False
    prompts: Path | None = None
    seed: int = 0
    new_tokens: int = 24
    report: Path | None = None
    expect: Path | None = None
    expected_refusals: tuple[Any, ...] = ()  # expect.ExpectedRefusal
    baselines: Path | None = None
    update_baselines: bool = False
    speed_budget: float | None = None
    sources: dict[str, str] = field(default_factory=dict)


def add_options(parser: pytest.Parser) -> None:
    """Register every option as a command-line flag and an ini key (cheap: no imports, no I/O)."""
    group = parser.getgroup("llmopt", "LLM inference optimizations (pytest-llmopt)")
    for spec in OPTIONS:
        extra = f" [env {spec.env}, ini {spec.ini}]"
        if spec.kind == "bool":
            group.addoption(spec.flag, action="store_const", const="true", default=None, dest=spec.dest, help=spec.help + extra)
        elif spec.kind == "list":
            group.addoption(spec.flag, action="append", default=None, dest=spec.dest, metavar=spec.metavar, help=spec.help + extra)
        else:
            group.addoption(spec.flag, action="store", default=None, dest=spec.dest, metavar=spec.metavar, help=spec.help + extra)
        ini_type = {"list": "linelist", "bool": "bool"}.get(spec.kind, "string")
        parser.addini(spec.ini, spec.help, type=ini_type, default=None)  # type: ignore[arg-type]


def resolve(
    cli: dict[str, Any],
    env: dict[str, str],
    ini: dict[str, Any],
    ini_path: Path | None,
    cwd: Path,
) -> Settings:
    """Apply CLI > env > ini > default to every option; raise UsageError naming the source of a bad value."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    ini_base = ini_path.parent if ini_path else cwd
    ini_where = str(ini_path) if ini_path else "the ini file"
    for spec in OPTIONS:
        raw, source, base = _pick(spec, cli, env, ini, ini_where, ini_base, cwd)
        try:
            values[spec.dest] = spec.convert(raw, base)
        except ValueError as exc:
            raise pytest.UsageError(f"pytest-llmopt: bad value {source.describe(raw)}: {exc}") from None
        sources[spec.name] = source.kind if source.kind == "default" else source.where
    return Settings(
        models=values["llmopt_model"],
        assistant=values["llmopt_assistant"],
        device=values["llmopt_device"],
        dtype=values["llmopt_dtype"],
        variants=values["llmopt_variants"],
        trust_remote_code=values["llmopt_trust_remote_code"],
        prompts=values["llmopt_prompts"],
        seed=values["llmopt_seed"],
        new_tokens=values["llmopt_new_tokens"],
        report=values["llmopt_report"],
        expect=values["llmopt_expect"],
        expected_refusals=values["llmopt_expected_refusal"],
        baselines=values["llmopt_baselines"],
        update_baselines=values["llmopt_update_baselines"],
        speed_budget=values["llmopt_speed_budget"],
        sources=sources,
    )


def _pick(
    spec: OptionSpec,
    cli: dict[str, Any],
    env: dict[str, str],
    ini: dict[str, Any],
    ini_where: str,
    ini_base: Path,
    cwd: Path,
) -> tuple[Any, Source, Path]:
    if cli.get(spec.dest) is not None:
        return cli[spec.dest], Source("cli", spec.flag), cwd
    if env.get(spec.env, "").strip():
        return env[spec.env], Source("env", spec.env), cwd
    if ini.get(spec.ini) is not None:
        return ini[spec.ini], Source("ini", f"{spec.ini} in {ini_where}"), ini_base
    return spec.default, Source("default", "default"), cwd


def from_config(config: pytest.Config) -> Settings:
    """Resolve the settings of a pytest session (reads its options, os.environ and its ini file)."""
    cli = {spec.dest: getattr(config.option, spec.dest, None) for spec in OPTIONS}
    ini = {spec.ini: config.getini(spec.ini) for spec in OPTIONS}  # None where the ini file is silent
    return resolve(cli, dict(os.environ), ini, config.inipath, Path(config.invocation_params.dir))
