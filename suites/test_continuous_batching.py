"""Continuous batching with a paged kv-cache (``generate_batch``, ``init_continuous_batching`` and its manager):
each request gets the answer of plain greedy ``generate()`` on its prompt alone, however it was scheduled.

Requests are the session's prompts, and their first halves, each with its own ``max_new_tokens``: more tokens
than one step takes (``max_batch_tokens``), pages small enough that every prompt spans several. The paged path
answers with tokens and their log-probabilities, not logits, so each answer is judged on its own tokens by the
higher-precision, cache-free reference (choices.py): every token the reference's best within the noise floor
of the plain path, every log-probability within the floor, the length the request allows.

Attention: each implementation continuous batching accepts is kept (``auto_switch_to_flash=False``, or pinned
where a release lacks it); the default, which switches a half-precision model to FlashAttention where it is
installed, has its own check. FlashAttention's paged kernel takes pages of a multiple of 256 tokens only: there the
pages are that long, so a prompt spans one.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
import torch

from pytest_llmopt.api import (
    FLOOR_FACTOR,
    Floor,
    Generation,
    batching,
    floor_of,
    judge_answer,
    not_exercised,
    not_run,
    summary,
    unsupported,
)

PAGE = 16  # tokens per page: every prompt spans several
STEP_TOKENS = 32  # max_batch_tokens: fewer than the requests' prompts together, so they are scheduled over steps
BLOCKS = 64  # enough for every request at once
ATTENTION = ["sdpa", "eager", "flash_attention_2", "flex_attention"]
NO_INTERFACE = ["batching-runs-models-without-attention-interface"]
KNOWN = ["paged-eager-ignores-attention-softcap", *NO_INTERFACE]


def pinned(model: Any, page: int = PAGE, blocks: int | None = None, **extra: Any) -> Any:
    """A paged cache of this suite's size, with the model's own attention kept (not switched to flash): pages of
    ``page`` tokens (or the multiple of 256 FlashAttention's kernel takes), ``blocks`` of them (default: the room
    of BLOCKS pages of PAGE tokens, and at least BLOCKS // 2 pages)."""
    size = batching.page_size(model, page)
    settings = {"max_batch_tokens": STEP_TOKENS, **extra}
    return batching.config(size, num_blocks=blocks or max(BLOCKS * PAGE // size, BLOCKS // 2), keep_attention=True, **settings)


def requests(case, runner) -> list[batching.Request]:
    """Each prompt whole and cut to its first half (several lengths), each with its own max_new_tokens."""
    out = []
    for prompt in case.prompts:
        ids = runner.encode(prompt.text)[0][0].tolist()
        for part, cut in (("whole", ids), ("half", ids[: max(2, len(ids) // 2)])):
            new = max(2, case.new_tokens - (3 * len(out)) % max(case.new_tokens // 2, 1))
            out.append(batching.Request(f"{prompt.name}:{part}", tuple(cut), new))
    return out


def require_batching() -> None:
    """A release without continuous batching: every check here is unsupported, saying so."""
    reason = batching.unsupported_reason()
    if reason:
        unsupported(reason)


def served(case, runner, reqs, cb_config, later=(), eos=None) -> batching.Served:
    """The requests through a fresh manager on the target's model; a release or an attention that continuous
    batching does not take is unsupported, with transformers' words."""
    require_batching()
    with runner.active() as model:
        try:
            return batching.run(model, reqs, cb_config, later=later, eos=eos)
        except ValueError as exc:
            if batching.refused(exc):
                unsupported(f"unsupported by transformers: {exc}")
            raise


class Judge:
    """The plain path's answers and floor for a set of requests (computed once per test), and the verdicts."""

    def __init__(self, case) -> None:
        self.case = case
        self.plain = case.reference
        self.precise = case.precise(self.plain)
        self.factor = FLOOR_FACTOR[case.session.machine.dtype]
        self._plain: dict[tuple[tuple[int, ...], int], Generation] = {}
        self._floors: dict[tuple[tuple[tuple[int, ...], int], ...], Floor] = {}

    def plain_answer(self, request: batching.Request) -> Generation:
        key = (request.prompt, request.new_tokens)
        if key not in self._plain:
            ids = torch.tensor([list(request.prompt)], device=self.plain.model.device)
            self._plain[key] = self.plain.generate(ids, None, request.new_tokens)
        return self._plain[key]

    def floor(self, reqs) -> Floor:
        key = tuple((r.prompt, r.new_tokens) for r in reqs)
        if key not in self._floors:  # the same requests are judged once per schedule: one reference forward each
            generations = [self.plain_answer(r) for r in reqs]
            self._floors[key] = floor_of(generations, [self.precise.generation_logits(g) for g in generations])
        return self._floors[key]

    def check(self, reqs, run: batching.Served, what: str, expected=None) -> list:
        """Every request's answer against the reference; fails the test naming each bad one. ``expected``:
        the length each answer must have, by request (default: its new_tokens)."""
        floor = self.floor(reqs)
        verdicts, problems = [], []
        for request in reqs:
            answer = run.answers.get(request.name)
            if answer is None or answer.error:
                problems.append(f"request {request.name}: {'no answer' if answer is None else 'failed: ' + str(answer.error)}")
                continue
            prompt = torch.tensor([list(request.prompt)])
            sequence = torch.cat([prompt, torch.tensor([list(answer.tokens)], dtype=prompt.dtype)], dim=1)
            reference = self.precise.generation_logits(Generation(prompt, sequence, None))[0] if answer.tokens else torch.zeros(0, 1)
            length = request.new_tokens if expected is None else expected(request, answer)
            verdict = judge_answer(
                request.name, request.prompt, answer.tokens, answer.logprobs, length, reference,
                self.plain_answer(request).new_tokens[0].tolist(), floor, self.factor, self.plain.tokenizer,
            )
            verdicts.append(verdict)
            if verdict.problem:
                problems.append(verdict.problem)
        logprobs = any(a.logprobs for a in run.answers.values())
        self.case.record(**{k: v for k, v in summary(verdicts, floor, self.factor, logprobs).items() if v is not None}, attention_ran=run.attention)
        if problems:
            pytest.fail(
                f"{self.case.label} ({what}, attention {run.attention}): {len(problems)} of {len(reqs)} request(s) not answered as "
                f"plain greedy answers each alone:\n  " + "\n  ".join(problems[:4]) + f"\n  reproduce: {self.case.reproduce}",
                pytrace=False,
            )
        return verdicts


@pytest.mark.llmopt(attention=ATTENTION, reference={}, known_issues=KNOWN)
def test_requests_match_greedy_alone(llmopt_case):
    """A mix of requests (several prompt lengths and max_new_tokens, more than one step takes) through
    ``generate_batch``'s manager: each answer is plain greedy's on its prompt alone."""
    case = llmopt_case
    reqs = requests(case, case.target)
    with case.explain("continuous batching"):
        run = served(case, case.target, reqs, pinned(case.target.model))
    Judge(case).check(reqs, run, "a mix of requests")


@pytest.mark.llmopt(reference={}, known_issues=KNOWN)
def test_requests_added_while_others_run(llmopt_case):
    """Through the manager API: half of the requests first, the rest added once the first answer is back,
    while the others are still generating."""
    case = llmopt_case
    reqs = requests(case, case.target)
    first, later = reqs[: len(reqs) // 2], reqs[len(reqs) // 2 :]
    with case.explain("continuous batching, requests added while running"):
        run = served(case, case.target, first, pinned(case.target.model), later=later)
    Judge(case).check(reqs, run, "requests added while others run")


@pytest.mark.llmopt(reference={}, known_issues=KNOWN)
def test_scheduling_cannot_change_an_answer(llmopt_case):
    """The same requests in reverse arrival order, with pages of another size, and with a cache too small to hold
    them all at once (requests wait for blocks): every answer is still plain greedy's."""
    case = llmopt_case
    reqs = requests(case, case.target)
    judge = Judge(case)
    model = case.target.model
    longest = max(len(r.prompt) + r.new_tokens for r in reqs)
    small = batching.page_size(model, PAGE // 2)
    scarce = -(-longest // small) + 1  # room for the longest request and a little more
    runs = {
        "reverse arrival order": (list(reversed(reqs)), pinned(model)),
        f"pages of {small} tokens": (reqs, pinned(model, page=small, blocks=BLOCKS * 2)),
        f"a cache of {scarce} blocks of {small} tokens, too small for all at once": (reqs, pinned(model, page=small, blocks=scarce)),
    }
    answers = {}
    for what, (order, cb_config) in runs.items():
        with case.explain(what):
            run = served(case, case.target, order, cb_config)
        judge.check(reqs, run, what)
        answers[what] = run.answers
    identical = sum(len({a[r.name].tokens for a in answers.values()}) == 1 for r in reqs)
    case.record(identical_across_schedules=f"{identical} of {len(reqs)}", scarce_blocks=scarce)


@pytest.mark.llmopt(reference={}, known_issues=KNOWN)
def test_each_request_stops_at_its_eos(llmopt_case):
    """Each request with its own EOS (a token plain greedy says halfway through its answer) and its own
    max_new_tokens: it stops right after its first EOS, or at its limit, and not a token later or earlier."""
    case = llmopt_case
    reqs = requests(case, case.target)
    judge = Judge(case)
    # one EOS for all (the manager's generation config); per request, the limit still differs
    halfway = [judge.plain_answer(r).new_tokens[0].tolist() for r in reqs]
    eos = halfway[0][len(halfway[0]) // 2]

    def expected(request, answer):
        tokens = list(answer.tokens)
        return tokens.index(eos) + 1 if eos in tokens else request.new_tokens

    with case.explain("continuous batching with an EOS"):
        run = served(case, case.target, reqs, pinned(case.target.model), eos=eos)
    judge.check(reqs, run, f"EOS {eos}", expected=expected)
    stopped = sum(eos in a.tokens for a in run.answers.values())
    case.record(eos=eos, stopped_at_eos=stopped)
    if stopped == 0:
        not_exercised(f"no request's answer held the EOS {eos}: stopping at an EOS never ran")


@pytest.mark.llmopt(reference={}, known_issues=NO_INTERFACE)
def test_paged_cache_holds_what_it_says_and_is_freed(llmopt_case):
    """The paged cache's tensors hold blocks x page size x layers x kv heads x head dim x 2 x bytes (and at most a
    few reserved pages more), and nothing of it is left once the manager stops."""
    case = llmopt_case
    reqs = requests(case, case.target)[:2]
    require_batching()
    asked = pinned(case.target.model)
    with case.target.active() as model, batching.manager(model, batching.generation_config(model), asked) as running:
        batching.serve(running, reqs)
        size = batching.cache_size(running, model)
        cache = weakref.ref(running.batch_processor.cache)
    gc.collect()
    if size is None:
        unsupported("this release keeps the paged cache where the suite cannot read its size")
    reserved = size.allocated - size.kv_bytes
    block = size.kv_bytes // size.blocks
    case.record(blocks=size.blocks, page_size=size.page_size, kv_bytes=size.kv_bytes, allocated_bytes=size.allocated)
    problems = []
    if size.blocks < asked.num_blocks:
        problems.append(f"asked for {asked.num_blocks} blocks, the cache holds {size.blocks}")
    if not 0 <= reserved <= 4 * block:
        problems.append(
            f"the paged cache allocated {size.allocated} bytes for {size.blocks} blocks of {size.page_size} tokens, which hold "
            f"{size.kv_bytes} (layers x kv heads x head dim x 2 x bytes): {reserved:+d} bytes beside them, allowed 0 to {4 * block} "
            "(a few reserved pages)"
        )
    if cache() is not None:
        problems.append("the paged cache is still alive after the manager stopped")
    if problems:
        pytest.fail(f"{case.label}: " + "; ".join(problems), pytrace=False)


@pytest.mark.llmopt(reference={}, known_issues=KNOWN)
def test_persistent_manager_answers_the_second_batch(llmopt_case):
    """``generate_batch(persistent_manager=True)`` keeps its manager on the model: the second batch through it
    gets its own answers, not the first one's, and the model is as it was once the manager is destroyed."""
    case = llmopt_case
    reqs = requests(case, case.target)
    first, second = reqs[::2], reqs[1::2]
    if not second:
        not_run("one prompt gives one request: a second batch needs two prompts")
    judge = Judge(case)
    require_batching()
    with case.target.active() as model:
        gen = batching.generation_config(model)
        cb_config = pinned(model)
        new = max(r.new_tokens for r in reqs)
        with batching.kept_attention(model, cb_config):  # kept until the manager is destroyed, not only while it answers
            try:
                with case.explain("generate_batch, persistent"):
                    outs = [
                        model.generate_batch([list(r.prompt) for r in batch], generation_config=gen, continuous_batching_config=cb_config,
                                             persistent_manager=True, max_new_tokens=new)
                        for batch in (first, second)
                    ]
            finally:
                model.destroy_cached_continuous_batching_manager()
    for number, (batch, out) in enumerate(zip((first, second), outs)):
        named = [batching.Request(r.name, r.prompt, new) for r in batch]
        found = list(out.values())
        answers = {r.name: batching.Answer(tuple(o.generated_tokens), tuple(o.logprobs) or None, o.error) for r, o in zip(named, found)}
        judge.check(named, batching.Served(answers, "", None), f"batch {number + 1} of 2 through one persistent manager")


@pytest.mark.llmopt_whole_device  # its cache takes the free memory: another worker's test would run out of it
@pytest.mark.llmopt(reference={}, known_issues=KNOWN)
def test_default_configuration(llmopt_case):
    """What a user gets from ``generate_batch(inputs, generation_config)``: the cache sized from free GPU memory, CUDA
    graphs where transformers decides, and a half-precision model switched to FlashAttention where it is installed
    (the attention that ran is recorded). Each answer is plain greedy's."""
    case = llmopt_case
    if case.device_type != "cuda":
        not_run(
            "the default configuration sizes the paged cache from free accelerator memory: on a CPU it took 57 s and 14.7 GB "
            "for tiny-llama (transformers 5.25.0); run on a GPU runner (--llmopt-device=cuda)"
        )
    reqs = requests(case, case.target)
    with case.explain("continuous batching, default configuration"):
        run = served(case, case.target, reqs, batching.config(page_size=None, return_logprobs=True))
    Judge(case).check(reqs, run, "default configuration")


SAMPLES, SAMPLE_TOKENS = 50, 32  # 1,600 PIT values: 50 requests of one prompt, scheduled together
SAMPLING = {"plain": {}, "tempered-top-k": {"temperature": 0.7, "top_p": 0.9, "top_k": 40}}


class BatchedSampler:
    """``Runner.sample`` through continuous batching: each sample a request of the same prompt, all scheduled together,
    drawn with the release's own sampling (seeded by its config); EOS suppressed as the plain path's sampling has it."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner

    def sample(self, input_ids: torch.Tensor, samples: int, new_tokens: int, seed: int, top_k: int = 0, **settings: Any) -> torch.Tensor:
        """The new tokens of each sample [samples, new_tokens], as Runner.sample gives them."""
        prompt = tuple(input_ids[0].tolist())
        reqs = [batching.Request(f"sample {i}", prompt, new_tokens) for i in range(samples)]
        model = self.runner.model
        page = batching.page_size(model, PAGE)
        blocks = samples * (-(-(len(prompt) + new_tokens) // page) + 1)
        cb_config = pinned(model, page=page, blocks=blocks, max_batch_tokens=max(STEP_TOKENS, samples * 2), seed=seed)
        with self.runner.active() as model:
            run = batching.run(model, reqs, cb_config, do_sample=True, top_k=top_k, suppress_tokens=self.runner.eos_ids, **settings)
        rows = []
        for request in reqs:
            answer = run.answers[request.name]
            if answer.error or len(answer.tokens) != new_tokens:
                pytest.fail(f"{request.name}: {answer.error or f'answered {len(answer.tokens)} tokens, asked for {new_tokens}'}", pytrace=False)
            rows.append(list(answer.tokens))
        return torch.tensor(rows)


@pytest.mark.parametrize("setting", list(SAMPLING))
@pytest.mark.llmopt(reference={}, known_issues=KNOWN)
def test_sampling_keeps_the_distribution(llmopt_case, setting):
    """Sampled answers of 50 requests of one prompt, scheduled together, follow the model's processed distribution
    (PIT values, Kolmogorov-Smirnov, alpha 1e-3): the paged path and its sampler change no probability."""
    case = llmopt_case
    require_batching()
    prompt = case.prompts[0]
    with case.explain(f"continuous batching, sampling ({setting})"):
        case.check_distribution(BatchedSampler(case.target), prompt.text, SAMPLES, SAMPLE_TOKENS, what=f"continuous batching, {setting}, prompt {prompt.name!r}", **SAMPLING[setting])
