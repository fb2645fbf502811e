"""Lost support made visible: ``--llmopt-expect=REPORT.json``.

A combination (suite, check, model, variant) that *ran* in the expected report (passed, failed, a known
issue, inconclusive, not exercised: anything but refused or not run) and is now refused as unsupported
fails ("lost support"), unless the refusal is listed as expected for the installed versions with
``--llmopt-expected-refusal="transformers>=5.0: TEXT"`` (repeatable; TEXT is a piece of the refusal's
reason, case-insensitive). Without it, an upgrade that drops a path turns a green cell into a quiet skip.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

from ..common.outcomes import Status
from .report import Result, load

REFUSED = (Status.UNSUPPORTED, Status.NOT_RUN)  # statuses that are not "it ran"


@dataclass(frozen=True)
class ExpectedRefusal:
    """A refusal accepted where ``requirement`` holds on the installed packages (e.g. transformers>=5.0)."""

    requirement: Requirement
    says: str

    def covers(self, reason: str, versions: dict[str, str | None]) -> bool:
        installed = versions.get(self.requirement.name)
        if installed is None or self.says.lower() not in reason.lower():
            return False
        try:
            return self.requirement.specifier.contains(Version(installed), prereleases=True)
        except InvalidVersion:
            return False


def parse_refusal(text: str) -> ExpectedRefusal:
    """'transformers>=5.0: assisted generate is not supported with Static cache' (ValueError if malformed)."""
    spec, sep, says = text.partition(":")
    if not sep or not says.strip():
        raise ValueError(f"{text!r}: expected 'PACKAGE SPECIFIER: text of the refusal', e.g. 'transformers>=5.0: not supported with Static cache'")
    try:
        requirement = Requirement(spec.strip())
    except InvalidRequirement as exc:
        raise ValueError(f"{text!r}: {spec.strip()!r} is not a package requirement ({exc})") from None
    return ExpectedRefusal(requirement, says.strip())


@dataclass(frozen=True)
class Expectation:
    """What ran in the expected report, by result key."""

    path: Path
    ran: dict[str, Result]
    versions: dict[str, str | None]

    @classmethod
    def read(cls, path: Path) -> Expectation:
        """Raises report.ReportError (one clear message) for a missing or malformed report."""
        results, env = load(path)
        versions = env.get("versions", {}) if isinstance(env, dict) else {}
        return cls(path, {r.key: r for r in results if r.status not in REFUSED}, dict(versions) if isinstance(versions, dict) else {})

    def lost(self, key: str, reason: str, versions: dict[str, str | None], accepted: tuple[ExpectedRefusal, ...]) -> str | None:
        """The failure message when ``key``, refused now for ``reason``, ran in the expected report and no
        accepted refusal covers it; None otherwise."""
        before = self.ran.get(key)
        if before is None or any(refusal.covers(reason, versions) for refusal in accepted):
            return None
        then = self.versions.get("transformers") or "?"
        core = reason.split(": ", 1)[1] if reason.startswith("unsupported by") and ": " in reason else reason
        return (
            f"lost support: {key} ran in {self.path.name} (transformers {then}: {before.status.value}) and is now refused "
            f"(transformers {versions.get('transformers') or '?'}): {reason}. If this refusal is expected, list it: "
            f"--llmopt-expected-refusal='transformers>={versions.get('transformers') or 'X'}: {core.splitlines()[0][:60]}'"
        )
