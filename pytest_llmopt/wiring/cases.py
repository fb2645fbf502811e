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
from typing import TYPE_CHECKING, Any

import pytest

from ..common import outcomes
from ..common.outcomes import UNSUPPORTED_BY_MODEL, Status
from ..common.phases import timed
from ..running import variants
from ..running.models import ModelSpec
from .session import LlmoptSession

if TYPE_CHECKING:
    from ..running.machine import Machine
    from ..running.prompts import Prompt
    from ..running.runner import Runner



@dataclass(frozen=True)
class CaseParam:
    """The collected parameter of one test: which model, which variant, compared to what."""

    spec: ModelSpec
    variant: variants.Variant
    reference: variants.Variant
    skipped_as: Status | None = None  # skipped at collection: not run here, or unsupported
    known_issues: tuple[str, ...] = ()  # ids of the declared issues that apply here (the report names them)

    @property
    def id(self) -> str:
        return f"{self.variant.id}@{self.spec.name}"


def variants_of(marker: pytest.Mark, dtype: str) -> tuple[list[variants.Variant], dict[str, str]]:
    """The marker's variants, and the axis overrides that turn a variant into its reference."""
    from ..running import known_issues

    axes = {k: v for k, v in marker.kwargs.items() if k in variants.AXES}
    unknown = set(marker.kwargs) - set(variants.AXES) - {"reference", "known_issues"}
    if unknown:
        raise pytest.UsageError(f"@pytest.mark.llmopt: unknown argument(s) {sorted(unknown)}; axes: {list(variants.AXES)}, reference, known_issues")
    missing = known_issues.unknown(marker.kwargs.get("known_issues", ()))
    if missing:
        raise pytest.UsageError(f"@pytest.mark.llmopt: known_issues={missing} not in pytest_llmopt.running.known_issues.KNOWN_ISSUES")
    return variants.matrix(dtype=dtype, **axes), dict(marker.kwargs.get("reference") or {})


def params_for(session: LlmoptSession, marker: pytest.Mark) -> list[Any]:
    """pytest.param objects for every (model, variant), with their markers and skip reasons."""
    from ..common import outcomes
    from ..running import compat, known_issues, models, quantize

    machine = session.machine
    found, overrides = variants_of(marker, machine.dtype)
    out = []
    for spec in session.models:
        info = models.describe(spec, session.settings.trust_remote_code)
        for variant in found:
            if "attention" not in marker.kwargs and info.default_attention == "eager":
                variant = replace(variant, attention="eager")  # the model's own default, as from_pretrained picks it
            reference = replace(variant, **overrides)
            if reference.attention.startswith("sdpa") and not info.capabilities.get("sdpa", True):
                reference = replace(reference, attention="eager")  # the plain path of a model without SDPA (5.x Gemma2)
            marks: list[pytest.MarkDecorator] = [getattr(pytest.mark, name) for name in variant.markers()]
            skip = skip_reason(variant, machine, info.capabilities, info.class_name)
            missing = compat.missing_feature(variant.compile, machine.device_type) or quantize.unsupported(variant)
            skip = skip or ((Status.UNSUPPORTED, missing) if missing else None)
            if skip:
                marks.append(pytest.mark.skip(reason=skip[1]))
            issues = known_issues.known_issues(marker.kwargs.get("known_issues", ()), variant.cache, variant.attention, machine.device_type, info.config, variant.compile != "off")
            param = CaseParam(spec, variant, reference, skip[0] if skip else None, tuple(issue.id for issue in issues if not skip))
            if issues and not skip:  # one xfail, limited to the exceptions these bugs raise
                reason = "; ".join(issue.reason for issue in issues)
                raises = tuple(known_issues.exception_class(issue.raises) for issue in issues)
                marks.append(outcomes.known_issue(reason, raises, run=all(issue.run for issue in issues)))
            out.append(pytest.param(param, id=param.id, marks=marks))
    return out


def skip_reason(variant: variants.Variant, machine: Machine, capabilities: dict[str, bool], class_name: str) -> tuple[Status, str] | None:
    """Why a variant cannot run here: the machine first (not run: what the user can change), then the
    model (unsupported)."""
    for need in variant.machine_requirements():
        if not machine.has(need.key):
            return Status.NOT_RUN, need.how
    from ..running.compat import CAPABILITY_ATTRIBUTE

    for capability in variant.model_requirements():
        if not capabilities.get(capability, True):
            return Status.UNSUPPORTED, f"{UNSUPPORTED_BY_MODEL}: {class_name} does not declare {CAPABILITY_ATTRIBUTE[capability]}"
    return None


def label_items(items: Iterable[pytest.Item]) -> None:
    """Tell the report which model, variant and check each suite test is (skips included)."""
    from .report import describe_item

    for item in items:
        callspec = getattr(item, "callspec", None)
        param = callspec.params.get("llmopt_case") if callspec else None
        if callspec is not None and isinstance(param, CaseParam):
            extra = "-".join(str(v) for k, v in callspec.params.items() if k != "llmopt_case") or None
            describe_item(item, param.spec.name, param.variant.id, extra, param.skipped_as, param.known_issues)


def deselect(items: Iterable[pytest.Item], selection: variants.Selection) -> tuple[list[pytest.Item], list[pytest.Item]]:
    """Split items into (kept, deselected) by --llmopt-variants."""
    kept: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        param = getattr(getattr(item, "callspec", None), "params", {}).get("llmopt_case")
        (kept if not isinstance(param, CaseParam) or selection.matches(param.variant) else dropped).append(item)
    return kept, dropped


class Case:
    """What a suite test works with: runners for the variant and its reference, the noise-floor verdicts, and
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
    def variant(self) -> variants.Variant:
        return self.param.variant

    @property
    def new_tokens(self) -> int:
        return self.session.settings.new_tokens

    @property
    def prompts(self) -> tuple[Prompt, ...]:
        return self.session.prompts

    @property
    def assistant(self) -> ModelSpec | None:
        """The session's --llmopt-assistant, or None."""
        return self.session.assistant

    @property
    def device_type(self) -> str:
        """"cpu" or "cuda"."""
        return self.session.machine.device_type

    @property
    def dtype(self) -> str:
        """The session's dtype: "float32", "float16" or "bfloat16"."""
        return self.session.machine.dtype

    @property
    def max_positions(self) -> int | None:
        """The longest sequence this case's model takes (from its config), None when it does not say."""
        return self.session.store.describe(self.spec).max_positions

    def tokenizer(self, spec: ModelSpec | None = None) -> Any:
        """The tokenizer of ``spec`` (default: this case's model), without loading its weights."""
        return self.session.store.tokenizer(spec or self.spec)

    @property
    def seed(self) -> int:
        return self.session.settings.seed

    @property
    def label(self) -> str:
        return f"{self.param.id} vs {self.param.reference.id}"

    def runner(self, variant: variants.Variant | None = None, spec: ModelSpec | None = None) -> Runner:
        """A Runner for ``variant`` (default: this case's) of ``spec`` (default: this case's model).

        Loading errors fail the test with the loader's one-line message; a composite model whose
        parts do not all declare what the variant needs is skipped as unsupported.
        """
        from ..common import outcomes
        from ..running import compat
        from ..running.models import LoadError
        from ..running.runner import Runner

        variant = variant or self.variant
        if spec is not None and spec != self.spec and variant.attention == "sdpa":
            from ..running import models

            if models.describe(spec, self.session.settings.trust_remote_code).default_attention == "eager":
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
                outcomes.unsupported(f"{UNSUPPORTED_BY_MODEL}: a part of {type(model).__name__} does not declare {compat.CAPABILITY_ATTRIBUTE[capability]}")
        return runner

    @property
    def target(self) -> Runner:
        return self.runner()

    @property
    def reference(self) -> Runner:
        return self.runner(self.param.reference)

    @timed("reference")
    def precise(self, plain: Runner | None = None) -> Any:
        """The higher-precision reference of the plain path's model (reference.Precise; ``plain`` defaults to
        this case's reference runner); a check that needs it is not run where no copy fits, with the reason."""
        from ..running.reference import precise_for

        found = precise_for((plain or self.runner(self.param.reference)).model, self.session.machine.dtype)
        if found.model is None:
            outcomes.not_run(f"no higher-precision reference for the noise floor ({found.name})")
        return found

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
            known = self.node.get_closest_marker("xfail")  # a declared known issue's own exception: its xfail judges it
            if known and isinstance(exc, known.kwargs.get("raises") or ()):
                raise
            pytest.fail(
                f"{self.label} ({what}): the optimized path raised {outcomes.summary_line(exc)}\n  reproduce: {self.reproduce}",
                pytrace=False,
            )

    @timed("verdict")
    def check_greedy(self, reference: Any, candidate: Any, what: str = "", plain: Runner | None = None) -> Any:
        """Fail the test unless ``candidate``'s logits stay within the noise floor of ``reference`` (the plain
        path), both judged against a higher-precision cache-free forward over the reference's tokens; where the
        two part at a near-tie, the candidate is replayed teacher-forced (equivalence.compare_greedy).

        ``plain``: the runner that made ``reference`` when it is not this case's reference (e.g. a quantized
        model). Lists of generations (one prompt each) get one verdict over all their positions (equivalence.stack);
        empty lists, none. Keeps the worst figures seen in this test for the report."""
        from ..running.instrumentation import uncounted
        from ..verdicts.equivalence import compare_greedy, stack

        pairs = list(zip(*(list(x) if isinstance(x, (list, tuple)) else [x] for x in (reference, candidate))))
        mismatch = [p for p in pairs if p[0].new_tokens.shape != p[1].new_tokens.shape]
        if not (pairs := mismatch[:1] or pairs):  # a length mismatch is judged alone (compare_greedy says so), with no replay
            return None
        runner = plain or self.runner(self.param.reference)
        precise = self.precise(runner)
        replays = []  # each candidate on its reference's tokens: itself where they agree, else replayed
        for ref, cand in [] if mismatch else pairs:
            if bool((ref.new_tokens == cand.new_tokens).all()):
                replays.append(cand)
            elif cand.replay is not None:
                with self.explain("teacher-forced replay"), uncounted():
                    replays.append(cand.replay(ref.new_tokens))
        reference, candidate = stack([p[0] for p in pairs]), stack([p[1] for p in pairs])
        forced = stack(replays) if len(replays) == len(pairs) else None
        verdict = compare_greedy(
            reference,
            candidate,
            precise.generation_logits(reference),
            runner.tokenizer,
            runner.eos_ids,
            forced=forced,
            precise_name=precise.name,
            **self._judged(what),
        )
        return self._decided(verdict)

    @timed("verdict")
    def check_distribution(
        self,
        runner: Runner,
        text: str | Any,
        samples: int,
        new_tokens: int,
        what: str = "",
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        **extra: Any,
    ) -> Any:
        """Fail unless sampled continuations of ``text`` (or token ids [1, T]) on ``runner`` (with ``extra``
        generate arguments, e.g. an assistant, and the settings ``temperature``, ``top_p``, ``top_k``,
        ``repetition_penalty``) follow the plain model's *processed* distribution (distribution.distribution_test)."""
        import torch

        from ..verdicts.distribution import MIN_PIT_VALUES, BoundaryRule, distribution_test, more_batches

        plain = self.runner(self.param.reference)
        ids = plain.encode(text)[0] if isinstance(text, str) else text
        settings: dict[str, Any] = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "repetition_penalty": repetition_penalty}
        undecided = None
        if top_k > 0:  # steps whose top-k set the run dtype cannot decide are left out (distribution.BoundaryRule)
            precise, device, cut = self.precise(plain), plain.model.device, {"temperature": temperature, "repetition_penalty": repetition_penalty}
            processed = lambda logits, full: plain.processed(logits, full, ids.shape[1], **cut)  # noqa: E731
            undecided = BoundaryRule(
                lambda full: processed(plain.forward_logits(full.to(device), None), full), lambda full: processed(precise.logits(full.to(device), None), full), top_k
            )

        def judge(drawn: Any) -> Any:
            label = self._label(what)
            exact = lambda full: plain.exact_probs(full, ids.shape[1], **settings)  # noqa: E731
            return distribution_test(drawn.cpu(), ids[0].cpu(), exact, seed=self.seed, label=label, reproduce=self.reproduce, undecided=undecided)

        drawn = runner.sample(ids, samples, new_tokens, self.seed, **settings, **extra)
        verdict = judge(drawn)
        more = more_batches(verdict.values) if undecided is not None else 0
        if more:  # as many draws again as the undecided steps need, with other seeds, up to distribution.MAX_BATCHES
            drawn = torch.cat([drawn, *(runner.sample(ids, samples, new_tokens, self.seed + 1 + i, **settings, **extra) for i in range(more))])
            verdict = judge(drawn)
        self.record(ks_statistic=round(verdict.statistic, 5), ks_pvalue=verdict.pvalue, pit_values=verdict.values)
        if undecided is not None:
            self.record(pit_left_out=verdict.left_out, top_k_gap_median=undecided.gap_median, top_k_noise_median=undecided.noise_median)
        if not verdict.ok:
            pytest.fail(verdict.message, pytrace=False)
        if verdict.values < MIN_PIT_VALUES:
            outcomes.not_exercised(
                f"the top-k boundary was within the run dtype's noise at {verdict.left_out} of {verdict.left_out + verdict.values} "
                f"sampled steps ({drawn.shape[0]} samples): {verdict.values} PIT values left, fewer than {MIN_PIT_VALUES}"
            )
        return verdict

    @timed("verdict")
    def check_logits(self, reference: Any, candidate: Any, ids: Any, mask: Any, what: str = "") -> Any:
        """Fail the test unless the candidate's logits of one forward pass over ``ids`` stay within the noise
        floor of the plain path's (``reference``) at every real position, both judged against a
        higher-precision forward of the same input (equivalence.compare_logits)."""
        from ..verdicts.equivalence import compare_logits

        precise = self.precise()
        verdict = compare_logits(
            reference,
            candidate,
            precise.logits(ids, mask),
            None if mask is None else mask.cpu(),
            precise_name=precise.name,
            **self._judged(what),
        )
        return self._decided(verdict)

    def _judged(self, what: str) -> dict[str, Any]:
        """How every equivalence verdict of this case is judged and named: the dtype's floor factor, the label, the
        reproduce line."""
        from ..verdicts.equivalence import FLOOR_FACTOR

        return {"factor": FLOOR_FACTOR[self.session.machine.dtype], "label": self._label(what), "reproduce": self.reproduce}

    def _label(self, what: str) -> str:
        return f"{self.label}{' (' + what + ')' if what else ''}"

    def _decided(self, verdict: Any) -> Any:
        """The one place a check_* verdict fails the test: its figures kept, its message the failure."""
        self._keep_stats(verdict.stats)
        if not verdict.ok:
            pytest.fail(verdict.message, pytrace=False)
        return verdict

    def _keep_stats(self, stats: dict[str, Any]) -> None:
        """Keep the worst of each figure over this test's checks (largest errors, floors and ratios, smallest
        tie margin, near-ties and teacher-forced replays counted) for the report."""
        seen = self.stats
        for key, value in stats.items():
            if value is None:
                continue
            if isinstance(value, (str, bool)):
                if key == "teacher_forced":
                    seen["teacher_forced"] = seen.get("teacher_forced", 0) + int(value)
                else:
                    seen.setdefault(key, value)
            elif key == "min_tie_margin":
                seen[key] = value if seen.get(key) is None else min(seen[key], value)
            elif key == "near_ties":
                seen[key] = seen.get(key, 0) + value
            else:
                seen[key] = max(seen.get(key) or 0.0, value)
        self.record(**seen)

    def record(self, **metrics: Any) -> None:
        """Attach measured figures to this test's result (they reach the report, also through xdist)."""
        from .report import record

        record(self.node, **metrics)
