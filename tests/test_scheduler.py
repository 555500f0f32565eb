"""jaxrun.scheduler in process on the tiny checkpoint: a long prompt is prefilled a chunk per turn
between decode steps of the running sequences; a failing step fails the requests it touched and the
engine goes on; stop ids and max_tokens cut a speculative step's tokens."""
import asyncio
import threading

import pytest

from jaxrun.engine_api import Finished, Request, SamplingParams, Tokens
from jaxrun.load import load
from jaxrun.runner import Runner
from jaxrun.scheduler import Scheduler
from jaxrun.sharding import make_mesh

CONTEXT, CHUNK = 256, 16


@pytest.fixture(scope="module")
def runner(tiny_checkpoint):
    mesh = make_mesh(1)
    ckpt, params = load(str(tiny_checkpoint), mesh, "f32", progress=False)
    return Runner(params, ckpt.config.text, mesh, "f32")


def request(prompt, max_tokens=8, stop=()):
    return Request(tuple(prompt), max_tokens, SamplingParams(), frozenset(stop))


async def collect(stream) -> tuple[list[int], Finished]:
    tokens = []
    async for event in stream:
        if isinstance(event, Tokens):
            tokens.extend(event.token_ids)
        elif isinstance(event, Finished):
            return tokens, event


def serve(runner, coro_fn, **kw):
    engine = Scheduler(runner, slots=2, max_context=CONTEXT, chunk=CHUNK, **kw).start()
    try:
        return asyncio.run(coro_fn(engine))
    finally:
        engine.shutdown()


def test_long_prompt_prefills_one_chunk_between_decode_steps(runner, monkeypatch):
    calls = []
    step, chunk_fn = runner.step, runner.chunk_fn
    monkeypatch.setattr(runner, "step", lambda *a: calls.append("step") or step(*a))
    monkeypatch.setattr(runner, "chunk_fn", lambda *a, **k: calls.append("chunk") or chunk_fn(*a, **k))

    async def main(engine):
        short = aiter(engine.submit(request([5, 17, 300], max_tokens=40)))
        first = await anext(short)                                       # the short one is decoding
        calls.clear()
        long = engine.submit(request(list(range(1, 101)), max_tokens=2))
        (rest, end), done_long = await asyncio.gather(collect(short), collect(long))
        return (list(first.token_ids) + rest, end), done_long

    (short, end_short), (long, end_long) = serve(runner, main)
    assert (end_short.reason, end_long.reason) == ("length", "length") and len(short) == 40 and len(long) == 2
    chunks = [i for i, c in enumerate(calls) if c == "chunk"]
    assert len(chunks) == -(-100 // CHUNK)                               # 7 chunks of 16
    assert all(calls[i + 1] == "step" for i in chunks[:-1])             # a decode step after every chunk


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(runner, monkeypatch):
    step, failed = runner.step, []

    def flaky(*a):
        if not failed and threading.current_thread().name == "scheduler":   # not the warm-up step
            failed.append(1)
            raise RuntimeError("injected")
        return step(*a)

    monkeypatch.setattr(runner, "step", flaky)

    async def main(engine):
        first = await collect(engine.submit(request([5, 17, 300])))
        second = await collect(engine.submit(request([5, 17, 300])))
        return first, second

    (tokens, end), (again, end2) = serve(runner, main)
    assert end.reason == "error" and "injected" in end.error and len(tokens) == 1   # the first token came before
    assert end2.reason == "length" and len(again) == 8


def test_stop_id_and_max_tokens_cut_a_speculative_step(runner):
    greedy = runner.generate([[5, 17, 300, 42]], 8, max_context=CONTEXT)[0].token_ids
    stop = greedy[3]
    assert stop not in greedy[:3]

    async def main(engine):
        return await asyncio.gather(collect(engine.submit(request([5, 17, 300, 42], stop={stop}))),
                                    collect(engine.submit(request([5, 17, 300, 42], max_tokens=5))))

    (cut, end), (five, end5) = serve(runner, main, speculative=2)
    assert cut == greedy[:4] and end.reason == "stop"
    assert five == greedy[:5] and end5.reason == "length"


def test_a_step_of_the_first_slots_is_the_full_step_on_them(runner):
    """runner.step(state, S, active=2) on 4 slots: the first two slots' tokens and logits as the full
    step gives them, the other two slots' state untouched."""
    import jax
    import numpy as np
    from jaxrun.sampling import Sampling
    prompts = [[5, 17, 300], [64, 2, 11, 400], [7, 7], [1, 2, 3, 4, 5]]
    fresh = lambda: runner.start(prompts, CONTEXT, Sampling())[0]  # noqa: E731
    full_state, full = runner.step(fresh(), CONTEXT)
    before = jax.tree.map(np.asarray, fresh())
    part_state, part = runner.step(fresh(), CONTEXT, active=2)
    assert part.tokens.shape[0] == 2
    np.testing.assert_array_equal(np.asarray(part.tokens), np.asarray(full.tokens)[:2])
    np.testing.assert_allclose(np.asarray(part.logits), np.asarray(full.logits)[:2], rtol=1e-5, atol=1e-5)
    for whole, stepped, untouched in zip(jax.tree.leaves(full_state), jax.tree.leaves(part_state),
                                         jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(stepped)[2:], untouched[2:])
        np.testing.assert_allclose(np.asarray(stepped)[:2], np.asarray(whole)[:2], rtol=1e-5, atol=1e-5)


def test_steps_run_only_the_busy_leading_slots(runner, monkeypatch):
    """With one request on a 4-slot engine every step runs one slot; its tokens are those it gets when
    the engine steps all slots."""
    actives = []
    step = runner.step
    monkeypatch.setattr(runner, "step", lambda state, S, active=None: actives.append(active) or step(state, S, active))

    async def main(engine):
        return await collect(engine.submit(request([5, 17, 300], max_tokens=6)))

    engine = Scheduler(runner, slots=4, max_context=CONTEXT, chunk=CHUNK).start()
    try:
        actives.clear()                                                  # after the warm-up's steps
        alone, end = asyncio.run(main(engine))
    finally:
        engine.shutdown()
    assert end.reason == "length" and len(alone) == 6 and set(actives) == {1}
    monkeypatch.setattr(runner, "step", lambda state, S, active=None: step(state, S))
    assert serve(runner, main)[0] == alone
