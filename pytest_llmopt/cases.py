"""Cases: a model under a variant, with the reference it is compared to.

A suite test asks for the ``llmopt_case`` fixture and carries the ``llmopt`` marker, e.g.::

    @pytest.mark.llmopt(cache=["static", "static-object"], reference={"cache": "dynamic"})
    def test_static_matches_dynamic(llmopt_case): ...

Collection crosses every session model with the marker's variants. A variant the machine cannot
run is skipped with a reason that says how to enable it; one the model does not declare is skipped
as "unsupported by the model"; one the installed transformers lacks, as "unsupported by transformers".
"""

from __future__ import annotations

import contextlib
import shlex
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest

from . import variants as V
from .models import ModelSpec
from .session import LlmoptSession

UNSUPPORTED_BY_MODEL = "unsupported by the model"
UNSUPPORTED_BY_STACK = "unsupported by transformers"
MARKER = "llmopt"


@dataclass(frozen=True)
class CaseParam:
    """The collected parameter of one test: which model, which variant, compared to what."""

    spec: ModelSpec
    variant: V.Variant
    reference: V.Variant

    @property
    def id(self) -> str:
        return f"{self.variant.id}@{self.spec.name}"


def variants_of(marker: pytest.Mark, dtype: str) -> tuple[list[V.Variant], dict[str, str]]:
    """The marker's variants, and the axis overrides that turn a variant into its reference."""
    axes = {k: v for k, v in marker.kwargs.items() if k in V.AXES}
    unknown = set(marker.kwargs) - set(V.AXES) - {"reference"}
    if unknown:
        raise pytest.UsageError(f"@pytest.mark.llmopt: unknown argument(s) {sorted(unknown)}; axes: {list(V.AXES)}, reference")
    return V.matrix(dtype=dtype, **axes), dict(marker.kwargs.get("reference") or {})


def params_for(session: LlmoptSession, marker: pytest.Mark, test_name: str) -> list[Any]:
    """pytest.param objects for every (model, variant), with their markers and skip reasons."""
    from . import compat, models, quantize

    machine = session.machine
    found, overrides = variants_of(marker, machine.dtype)
    out = []
    for spec in session.models:
        info = models.describe(spec, session.settings.trust_remote_code)
        for variant in found:
            if "attention" not in marker.kwargs and not info.capabilities.get("sdpa", True):
                variant = replace(variant, attention="eager")  # the model's own default, as from_pretrained picks it
            reference = replace(variant, **overrides)
            param = CaseParam(spec, variant, reference)
            marks: list[Any] = [getattr(pytest.mark, name) for name in variant.markers()]
            reason = skip_reason(variant, machine, info.capabilities, info.class_name)
            reason = reason or compat.missing_feature(variant.compile, variant.cache, machine.device_type)
            reason = reason or quantize.unsupported(variant)
            if reason:
                marks.append(pytest.mark.skip(reason=reason))
            issue = compat.known_issue(test_name, variant.cache, variant.attention, machine.device_type)
            if issue and not reason:
                marks.append(pytest.mark.xfail(reason=issue.reason, raises=compat.exception_class(issue.raises), strict=False))
            out.append(pytest.param(param, id=param.id, marks=marks))
    return out


def skip_reason(variant: V.Variant, machine: Any, capabilities: dict[str, bool], class_name: str) -> str | None:
    """Why a variant cannot run here: the machine first (what the user can change), then the model."""
    for need in variant.machine_requirements():
        if not machine.has(need.key):
            return need.how
    from .compat import CAPABILITY_ATTRIBUTE

    for capability in variant.model_requirements():
        if not capabilities.get(capability, True):
            return f"{UNSUPPORTED_BY_MODEL}: {class_name} does not declare {CAPABILITY_ATTRIBUTE[capability]}"
    return None


def label_items(items: Iterable[pytest.Item]) -> None:
    """Tell the report which model, variant and check each suite test is (skips included)."""
    from .report import describe_item

    for item in items:
        callspec = getattr(item, "callspec", None)
        param = callspec.params.get("llmopt_case") if callspec else None
        if isinstance(param, CaseParam):
            extra = "-".join(str(v) for k, v in callspec.params.items() if k != "llmopt_case") or None
            describe_item(item, param.spec.name, param.variant.id, extra)


def deselect(items: Iterable[pytest.Item], selection: V.Selection) -> tuple[list[pytest.Item], list[pytest.Item]]:
    """Split items into (kept, deselected) by --llmopt-variants."""
    kept, dropped = [], []
    for item in items:
        param = getattr(getattr(item, "callspec", None), "params", {}).get("llmopt_case")
        (kept if not isinstance(param, CaseParam) or selection.matches(param.variant) else dropped).append(item)
    return kept, dropped


class Case:
    """What a suite test works with: runners for the variant and its reference, tolerances, and
    the text that tells a user how to reproduce a failure."""

    def __init__(self, param: CaseParam, session: LlmoptSession, node: pytest.Item) -> None:
        self.param = param
        self.session = session
        self.node = node
        # The worst figures seen by this test's checks, recorded for the report.
        self.stats: dict[str, Any] = {"max_delta_logit": 0.0, "near_ties": 0, "min_tie_margin": None}

    @property
    def spec(self) -> ModelSpec:
        return self.param.spec

    @property
    def variant(self) -> V.Variant:
        return self.param.variant

    @property
    def new_tokens(self) -> int:
        return self.session.settings.new_tokens

    @property
    def prompts(self) -> Any:
        return self.session.prompts

    @property
    def seed(self) -> int:
        return self.session.settings.seed

    @property
    def label(self) -> str:
        return f"{self.param.id} vs {self.param.reference.id}"

    def runner(self, variant: V.Variant | None = None, spec: ModelSpec | None = None) -> Any:
        """A Runner for ``variant`` (default: this case's) of ``spec`` (default: this case's model).

        Loading errors fail the test with the loader's one-line message; a composite model whose
        parts do not all declare what the variant needs is skipped as unsupported.
        """
        from . import compat
        from .models import LoadError
        from .runner import Runner

        variant = variant or self.variant
        if spec is not None and spec != self.spec and variant.attention == "sdpa":
            from . import models

            if not models.describe(spec, self.session.settings.trust_remote_code).capabilities.get("sdpa", True):
                variant = replace(variant, attention="eager")  # another model (a draft): its own default attention
        runner = Runner(self.session.store, spec or self.spec, variant, self.session.machine)
        failure = None
        try:
            model = runner.model
        except LoadError as exc:
            failure = str(exc)
        if failure is not None:
            pytest.fail(failure, pytrace=False)
        caps = compat.model_capabilities(model)
        for capability in runner.variant.model_requirements():
            if not caps[capability]:
                pytest.skip(f"{UNSUPPORTED_BY_MODEL}: a part of {type(model).__name__} does not declare {compat.CAPABILITY_ATTRIBUTE[capability]}")
        return runner

    @property
    def target(self) -> Any:
        return self.runner()

    @property
    def reference(self) -> Any:
        return self.runner(self.param.reference)

    def tolerance(self, path: str = "cache") -> Any:
        from .equivalence import tolerance

        return tolerance(self.session.machine.dtype, path)

    @property
    def reproduce(self) -> str:
        s = self.session.settings
        words = ["pytest", self.node.nodeid, f"--llmopt-model={self.spec.ref}", f"--llmopt-seed={s.seed}"]
        words += [f"--llmopt-device={s.device}", f"--llmopt-dtype={s.dtype}", f"--llmopt-new-tokens={s.new_tokens}"]
        if s.prompts:
            words.append(f"--llmopt-prompts={s.prompts}")
        return " ".join(shlex.quote(w) for w in words)

    @contextlib.contextmanager
    def explain(self, what: str) -> Iterator[None]:
        """Turn an exception raised on the optimized path into a failure that says which case and step
        raised it, and how to reproduce it (pytest's own outcomes pass through)."""
        try:
            yield
        except (pytest.fail.Exception, pytest.skip.Exception, pytest.xfail.Exception):
            raise
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else ""
            pytest.fail(
                f"{self.label} ({what}): the optimized path raised {type(exc).__name__}: {first}\n  reproduce: {self.reproduce}",
                pytrace=False,
            )

    def check_greedy(self, reference: Any, candidate: Any, path: str = "cache", what: str = "") -> Any:
        """Fail the test unless ``candidate`` equals ``reference`` up to a near-tie (equivalence.compare_greedy).

        Keeps the worst figures seen in this test (max |Δlogit|, near-ties, smallest tie margin) for the report.
        """
        from .equivalence import compare_greedy

        runner = self.runner(self.param.reference)
        verdict = compare_greedy(
            reference,
            candidate,
            self.tolerance(path),
            runner.tokenizer,
            runner.eos_ids,
            label=f"{self.label}{' (' + what + ')' if what else ''}",
            reproduce=self.reproduce,
        )
        self._keep_stats(verdict.stats)
        if not verdict.ok:
            pytest.fail(verdict.message, pytrace=False)
        return verdict

    def check_distribution(self, runner: Any, text: str, samples: int, new_tokens: int, what: str = "", **extra: Any) -> Any:
        """Fail unless sampled continuations of ``text`` on ``runner`` (with ``extra`` generate arguments,
        e.g. an assistant) follow the plain model's distribution (equivalence.distribution_test)."""
        from .equivalence import distribution_test

        plain = self.runner(self.param.reference)
        ids, _ = plain.encode(text)
        drawn = runner.sample(ids, samples, new_tokens, self.seed, **extra)
        verdict = distribution_test(
            drawn.cpu(),
            ids[0].cpu(),
            lambda full: plain.exact_probs(full, ids.shape[1]),
            seed=self.seed,
            label=f"{self.label}{' (' + what + ')' if what else ''}",
            reproduce=self.reproduce,
        )
        self.record(ks_statistic=round(verdict.statistic, 5), ks_pvalue=verdict.pvalue, pit_values=verdict.values)
        if not verdict.ok:
            pytest.fail(verdict.message, pytrace=False)
        return verdict

    def check_logits(self, reference: Any, candidate: Any, mask: Any, path: str = "attention", what: str = "") -> Any:
        """Fail the test unless two forward passes' logits agree at every real (unpadded) position
        (equivalence.compare_logits); keeps the largest |Δlogit| seen for the report."""
        from .equivalence import compare_logits

        verdict = compare_logits(
            reference, candidate, mask, self.tolerance(path), label=f"{self.label}{' (' + what + ')' if what else ''}", reproduce=self.reproduce
        )
        self.stats["logits_max_delta"] = max(verdict.max_delta, self.stats.get("logits_max_delta", 0.0))
        self.record(logits_max_delta=self.stats["logits_max_delta"])
        if not verdict.ok:
            pytest.fail(verdict.message, pytrace=False)
        return verdict

    def _keep_stats(self, stats: dict[str, Any]) -> None:
        seen = self.stats
        seen["max_delta_logit"] = max(seen["max_delta_logit"], stats.get("max_delta_logit", 0.0))
        seen["near_ties"] += stats.get("near_ties", 0)
        margin = stats.get("min_tie_margin")
        if margin is not None:
            seen["min_tie_margin"] = margin if seen["min_tie_margin"] is None else min(seen["min_tie_margin"], margin)
        self.record(max_delta_logit=seen["max_delta_logit"], near_ties=seen["near_ties"], min_tie_margin=seen["min_tie_margin"])

    def record(self, **metrics: Any) -> None:
        """Attach measured figures to this test's result (they reach the report, also through xdist)."""
        from .report import record

        record(self.node, **metrics)
