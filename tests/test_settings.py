"""Options: one precedence rule (CLI > env > ini > default), validation, errors naming their source."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_llmopt.wiring import settings
from pytest_llmopt.wiring.expect import parse_refusal
from pytest_llmopt.wiring.settings import OPTIONS, resolve

# A valid, non-default raw value for every option, and what it resolves to.
SAMPLES = {
    "model": ("tiny-qwen2", ("tiny-qwen2",)),
    "assistant": ("tiny-gpt2", "tiny-gpt2"),
    "device": ("cpu", "cpu"),
    "dtype": ("bf16", "bfloat16"),
    "variants": ("attention=eager", "attention=eager"),
    "trust-remote-code": ("yes", True),
    "prompts": (None, None),  # needs a file: tested apart
    "seed": ("7", 7),
    "new-tokens": ("5", 5),
    "report": ("out.json", None),  # a path: tested apart
    "expect": (None, None),  # an existing report: tests/test_expect.py
    "expected-refusal": ("transformers>=5.0: not supported", (parse_refusal("transformers>=5.0: not supported"),)),
    "baselines": (None, None),  # a directory: tests/test_baselines.py
    "update-baselines": ("yes", True),
    "speed-budget": ("45", 45.0),
}
ANOTHER = {
    "model": "tiny-gemma2",
    "assistant": "tiny-llama",
    "device": "auto",
    "dtype": "float16",
    "variants": "cache=static",
    "trust-remote-code": "0",
    "seed": "9",
    "new-tokens": "6",
    "update-baselines": "0",
    "expected-refusal": "torch<3: refused",
    "speed-budget": "30",
}


def _value(result: settings.Settings, name: str):
    value = getattr(result, {"model": "models", "expected-refusal": "expected_refusals"}.get(name, name.replace("-", "_")))
    return str(value) if name == "variants" else value


def test_every_option_has_a_sample():
    assert set(SAMPLES) == {spec.name for spec in OPTIONS}


@pytest.mark.parametrize("spec", [s for s in OPTIONS if s.name in ANOTHER], ids=lambda s: s.name)
def test_precedence_cli_over_env_over_ini_over_default(spec, tmp_path):
    raw, expected = SAMPLES[spec.name]
    other = ANOTHER[spec.name]
    cli_value = [raw] if spec.kind == "list" else raw
    ini_value = [other] if spec.kind == "list" else other
    ini = {spec.ini: ini_value}
    env = {spec.env: other}

    with_cli = resolve({spec.dest: cli_value}, env, ini, tmp_path / "pytest.ini", tmp_path)
    assert _value(with_cli, spec.name) == expected
    assert with_cli.sources[spec.name] == spec.flag

    with_env = resolve({}, {spec.env: raw}, ini, tmp_path / "pytest.ini", tmp_path)
    assert _value(with_env, spec.name) == expected
    assert with_env.sources[spec.name] == spec.env

    with_ini = resolve({}, {}, {spec.ini: cli_value}, tmp_path / "pytest.ini", tmp_path)
    assert _value(with_ini, spec.name) == expected
    assert spec.ini in with_ini.sources[spec.name]

    default = resolve({}, {}, {}, None, tmp_path)
    assert default.sources[spec.name] == "default"


def test_empty_environment_value_falls_through_to_ini(tmp_path):
    result = resolve({}, {"LLMOPT_DEVICE": "  "}, {"llmopt_device": "cpu"}, tmp_path / "pytest.ini", tmp_path)
    assert result.device == "cpu"


@pytest.mark.parametrize(
    ("name", "bad", "fragment"),
    [
        ("device", "gpu", "expected auto, cpu, cuda or cuda:N"),
        ("dtype", "int8", "expected one of"),
        ("variants", "attention=magic", "matches nothing"),
        ("variants", "colour=red", "unknown axis"),
        ("trust-remote-code", "maybe", "expected true or false"),
        ("seed", "-1", "from 0 to"),
        ("new-tokens", "many", "expected an integer"),
        ("prompts", "no-such-file.txt", "no such file"),
        ("report", "report.pdf", "extension must be"),
        ("speed-budget", "0", "above 0"),
        ("speed-budget", "soon", "expected a number of seconds"),
    ],
)
def test_bad_values_name_their_source(name, bad, fragment, tmp_path):
    spec = next(s for s in OPTIONS if s.name == name)
    cli = {spec.dest: [bad] if spec.kind == "list" else bad}
    with pytest.raises(pytest.UsageError, match=f"{spec.flag}={bad}.*{fragment}"):
        resolve(cli, {}, {}, None, tmp_path)
    with pytest.raises(pytest.UsageError, match=f"environment variable {spec.env}='{bad}'.*{fragment}"):
        resolve({}, {spec.env: bad}, {}, None, tmp_path)
    ini_path = tmp_path / "tox.ini"
    with pytest.raises(pytest.UsageError, match=f"{spec.ini} in {ini_path} = {bad}.*{fragment}"):
        resolve({}, {}, {spec.ini: bad}, ini_path, tmp_path)


def test_model_list_from_env_is_comma_separated(tmp_path):
    result = resolve({}, {"LLMOPT_MODEL": "tiny-llama, tiny-gpt2"}, {}, None, tmp_path)
    assert result.models == ("tiny-llama", "tiny-gpt2")


def test_relative_paths_are_anchored_where_written(tmp_path):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "prompts.txt").write_text("hello\n")
    (tmp_path / "cwd").mkdir()
    (tmp_path / "cwd" / "prompts.txt").write_text("hi\n")
    ini = resolve({}, {}, {"llmopt_prompts": "prompts.txt"}, tmp_path / "conf" / "pytest.ini", tmp_path / "cwd")
    assert ini.prompts == tmp_path / "conf" / "prompts.txt"
    cli = resolve({"llmopt_prompts": "prompts.txt"}, {}, {}, tmp_path / "conf" / "pytest.ini", tmp_path / "cwd")
    assert cli.prompts == tmp_path / "cwd" / "prompts.txt"
    report = resolve({}, {}, {"llmopt_report": "out/r.md"}, tmp_path / "conf" / "pytest.ini", tmp_path / "cwd")
    assert report.report == tmp_path / "conf" / "out" / "r.md"


def test_local_model_folders_are_anchored(tmp_path):
    (tmp_path / "m").mkdir()
    result = resolve({"llmopt_model": ["m"]}, {}, {}, None, tmp_path)
    assert result.models == (str(tmp_path / "m"),)


def test_end_to_end_precedence_through_pytest(pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch) -> None:
    pytester.makeini("[pytest]\nllmopt_seed = 3\nllmopt_new_tokens = 7\nllmopt_dtype = float32\n")
    pytester.makeconftest(
        """
        def pytest_report_header(config):
            from pytest_llmopt.plugin import session_of
            s = session_of(config).settings
            return [f"RESOLVED seed={s.seed} new_tokens={s.new_tokens} dtype={s.dtype} sources={s.sources['seed']}|{s.sources['new-tokens']}|{s.sources['dtype']}"]
        """
    )
    pytester.makepyfile("def test_nothing(): pass")
    clean_env.setenv("LLMOPT_NEW_TOKENS", "9")
    result = pytester.runpytest("--llmopt-seed=5")
    result.stdout.fnmatch_lines(["RESOLVED seed=5 new_tokens=9 dtype=float32 sources=--llmopt-seed|LLMOPT_NEW_TOKENS|llmopt_dtype in *tox.ini"])
    assert result.ret == 0


def test_bad_ini_value_is_one_usage_error(pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch) -> None:
    pytester.makeini("[pytest]\nllmopt_device = tpu\n")
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: pytest-llmopt: bad value llmopt_device in *tox.ini = tpu: expected auto, cpu, cuda or cuda:N"])


def test_help_lists_every_option_with_its_env_and_ini_names(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help")
    text = result.stdout.str()
    for spec in OPTIONS:
        assert spec.flag in text, spec.flag
        assert spec.env in text, spec.env
        assert spec.ini in text, spec.ini
    assert result.ret == 0


def test_help_works_even_with_a_bad_environment(pytester: pytest.Pytester, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("LLMOPT_DEVICE", "nonsense")
    assert pytester.runpytest("--help").ret == 0


def test_ini_keys_are_listed_in_help(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(["*llmopt_model (linelist)*", "*llmopt_trust_remote_code (bool)*"])


def test_cli_flag_for_trust_remote_code_needs_no_value(tmp_path: Path) -> None:
    assert resolve({"llmopt_trust_remote_code": "true"}, {}, {}, None, tmp_path).trust_remote_code is True
    assert resolve({}, {}, {}, None, tmp_path).trust_remote_code is False
