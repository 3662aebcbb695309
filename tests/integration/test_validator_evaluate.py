"""The validator's evaluation engine on the real `test` preset base and real trained deltas.

One round with eight miners, committed in this order: two honest miners (different seeds), a
lazy miner shipping gaussian noise of an honest delta's size, an exact byte copy of the first
honest delta, a 1.01x-scaled + tiny-noise copy of the second, a delta with one NaN, one made
for another round, and a file that is not the artifact its miner committed to. Scores, rejections and duplicates are checked per miner, then that
the model is bit-identical afterwards and that two validators with the same seed agree.
"""

import dataclasses
import shutil

import pytest
import torch

from protocol.artifact.delta import max_delta_bytes, write_delta
from protocol.round.scoring import DUPLICATE, GENERAL_REGRESSION, INVALID, NO_IMPROVEMENT, OK, Entry

BLOCK_HASH = "0x" + "5c" * 32
ROUND, TASK = 3, 1
# Honest deltas here raise general loss by ~0.005-0.02 nats (measured over training and
# eval seeds); 0.05 lets them through while the guard still stops anything that forgets more.
TOLERANCE = 0.05
THRESHOLD = 0.95
EVAL = dict(seq_len=64, batch_size=4, domain_batches=24, general_batches=24, max_tokens=20_000)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("validator")


@pytest.fixture(scope="module")
def base(test_base):
    return test_base


@pytest.fixture(scope="module")
def assignment_path(test_assignment):
    return test_assignment


@pytest.fixture(scope="module")
def honest(work, train_honest):
    """Two honest deltas for ROUND: same recipe, different data order (seed)."""
    return train_honest(work, ROUND)


@pytest.fixture(scope="module")
def ctx(base, assignment_path):
    """Tokenizer, model, layout, assignment, base hash and the round's seed."""
    from transformers import AutoTokenizer

    from protocol.identity.hashing import sha256_dir
    from protocol.moe.evaluate import eval_seed
    from protocol.moe.experts import Assignment
    from protocol.moe.model import expert_layout, load_model

    model = load_model(base)
    return {
        "tokenizer": AutoTokenizer.from_pretrained(base),
        "model": model,
        "layout": expert_layout(model),
        "assignment": Assignment.load(assignment_path),
        "base_hash": sha256_dir(base),
        "seed": eval_seed(BLOCK_HASH, ROUND, TASK),
    }


def _eval_set(ctx, seed=None):
    from protocol.moe.evaluate import build_eval_set

    specs = ["corpus:prose", "corpus:code"]
    s = ctx["seed"] if seed is None else seed
    return build_eval_set(ctx["tokenizer"], "corpus:math", specs, s, **EVAL)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    assert changed == []


@pytest.fixture(scope="module")
def pristine(ctx):
    """The model's weights before any evaluation touched it."""
    return _state(ctx["model"])


@pytest.fixture(scope="module")
def evaluator(ctx, pristine):
    from protocol.moe.evaluate import Evaluator

    return Evaluator(ctx["model"], ctx["layout"], _eval_set(ctx))


def _read(ctx, path):
    from protocol.artifact.untrusted import read_delta_untrusted

    a = ctx["assignment"]
    return read_delta_untrusted(
        path, layout=ctx["layout"], assignment=a, max_bytes=max_delta_bytes(ctx["layout"], a)
    )


@pytest.fixture(scope="module")
def round_files(work, ctx, honest):
    """{hotkey: (path, sha256)} in commit order."""
    meta, d0 = _read(ctx, honest[0])
    _, d1 = _read(ctx, honest[1])
    g = torch.Generator().manual_seed(1234)
    files = {}

    def put(hotkey, tensors, m=meta):
        path = work / f"{hotkey}.safetensors"
        files[hotkey] = (path, write_delta(path, tensors, m))

    put("alice", d0)
    put("bob", d1)
    # Lazy miner: noise with the honest delta's per-tensor spread, no training at all.
    put("carol", {k: torch.randn(v.shape, generator=g) * v.std() for k, v in d0.items()})
    shutil.copyfile(honest[0], work / "dave.safetensors")  # byte copy of alice's artifact
    files["dave"] = (work / "dave.safetensors", files["alice"][1])
    put("erin", {k: 1.01 * v + 1e-4 * torch.randn(v.shape, generator=g) for k, v in d1.items()})
    nan = {k: v.clone() for k, v in d0.items()}
    raw = bytearray(_bytes_with_nan(work, nan, meta))
    (work / "frank.safetensors").write_bytes(raw)
    files["frank"] = (work / "frank.safetensors", _sha(raw))
    put("grace", d1, dataclasses.replace(meta, round=ROUND + 1))
    files["heidi"] = (files["bob"][0], "f" * 64)  # bytes that are not what heidi committed to
    return files


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _bytes_with_nan(work, tensors, meta) -> bytes:
    # write_delta refuses NaN, so write a clean file and poison one float32 in the data section.
    path = work / "clean-for-nan.safetensors"
    write_delta(path, tensors, meta)
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    raw[8 + n + 40 : 8 + n + 44] = bytes([0x00, 0x00, 0xC0, 0x7F])
    return bytes(raw)


@pytest.fixture(scope="module")
def outcomes(evaluator, ctx, round_files):
    from validator.evaluate import evaluate_round

    entries = [
        Entry(hotkey, sha, commit_block=100 + i)
        for i, (hotkey, (_, sha)) in enumerate(round_files.items())
    ]
    out = evaluate_round(
        evaluator,
        {h: p for h, (p, _) in round_files.items()},
        layout=ctx["layout"],
        assignment=ctx["assignment"],
        max_bytes=max_delta_bytes(ctx["layout"], ctx["assignment"]),
        expected_base_hash=ctx["base_hash"],
        expected_round=ROUND,
        entries=entries,
        general_tolerance=TOLERANCE,
        similarity_threshold=THRESHOLD,
        domain_name="math",
    )
    for h, o in out.items():
        print(f"{h}: {o.value:.5f} {o.code} {o.reason}")
    return out


def test_every_submission_has_an_outcome(outcomes, round_files):
    assert list(outcomes) == sorted(round_files)


def test_honest_deltas_score_positive(outcomes):
    for h in ("alice", "bob"):
        o = outcomes[h]
        assert o.code == OK, o.reason
        assert o.value > 0 and o.value == o.score.domain_lcb
        assert o.score.domain_mean > o.value  # the score is the lower bound, below the mean
        assert o.rejection is None and o.duplicate is None


def test_lazy_noise_scores_zero(outcomes):
    o = outcomes["carol"]
    assert o.value == 0.0 and o.code == NO_IMPROVEMENT, o.reason
    assert o.score.domain_lcb <= 0
    # Noise of the honest delta's size moves the loss by less than the honest lower bounds.
    assert abs(o.score.domain_mean) < min(outcomes[h].value for h in ("alice", "bob")) / 4


def test_exact_copy_is_a_digest_duplicate(outcomes):
    o = outcomes["dave"]
    assert o.value == 0.0 and o.code == DUPLICATE
    assert (o.duplicate.kind, o.duplicate.original) == ("digest", "alice")
    assert "alice" in o.reason and "earlier committer keeps the credit" in o.reason


def test_scaled_noisy_copy_is_a_similarity_duplicate(outcomes):
    o = outcomes["erin"]
    assert o.value == 0.0 and o.code == DUPLICATE
    assert (o.duplicate.kind, o.duplicate.original) == ("similarity", "bob")
    assert o.duplicate.similarity > 0.999


def test_rejections_carry_the_loader_code(outcomes):
    assert (outcomes["frank"].rejection, outcomes["frank"].code) == ("nonfinite", INVALID)
    assert "NaN/Inf" in outcomes["frank"].reason
    assert (outcomes["grace"].rejection, outcomes["grace"].code) == ("round", INVALID)
    assert (outcomes["heidi"].rejection, outcomes["heidi"].code) == ("sha256", INVALID)
    assert outcomes["frank"].value == outcomes["grace"].value == outcomes["heidi"].value == 0.0


def test_honest_miners_are_not_each_others_duplicates(ctx, honest):
    from validator.evaluate import similarities

    sims = similarities({"alice": _read(ctx, honest[0])[1], "bob": _read(ctx, honest[1])[1]})
    assert abs(sims[("alice", "bob")]) < 0.5


def test_model_bit_identical_after_the_round(outcomes, ctx, pristine):
    _assert_same_state(ctx["model"], pristine)


def test_revert_even_when_evaluation_raises(evaluator, ctx, honest, pristine):
    model = ctx["model"]
    deltas = [_read(ctx, p)[1] for p in honest]
    for d in deltas:
        evaluator.evaluate(d)
    calls = {"n": 0}
    forward = model.forward

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # midway through the domain batches, delta applied
            raise RuntimeError("device lost")
        return forward(*args, **kwargs)

    model.forward = flaky
    try:
        with pytest.raises(RuntimeError, match="device lost"):
            evaluator.evaluate(deltas[1])
    finally:
        del model.forward
    assert calls["n"] == 3
    _assert_same_state(model, pristine)
    # And the model still evaluates to exactly the base losses measured at the start.
    assert evaluator.evaluate({}) == (evaluator.base_domain, evaluator.base_general)


def test_same_seed_same_batches_and_scores(evaluator, ctx, base, honest):
    from protocol.moe.evaluate import Evaluator
    from protocol.moe.model import load_model
    from validator.evaluate import score_delta

    other_set = _eval_set(ctx)  # another validator, same block hash, round and task
    assert other_set.digest() == evaluator.eval_set.digest()
    mine = evaluator.eval_set
    pairs = zip(other_set.domain + other_set.general, mine.domain + mine.general, strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    other = Evaluator(load_model(base), ctx["layout"], other_set)
    assert (other.base_domain, other.base_general) == (
        evaluator.base_domain,
        evaluator.base_general,
    )
    d = _read(ctx, honest[0])[1]
    kw = dict(general_tolerance=TOLERANCE, domain_name="math")
    assert score_delta(other, d, **kw) == score_delta(evaluator, d, **kw)
    assert _eval_set(ctx, seed=ctx["seed"] + 1).digest() != other_set.digest()


def test_general_guard_zeroes_a_delta_that_forgets(evaluator, ctx, honest):
    from validator.evaluate import score_delta

    d = _read(ctx, honest[1])[1]
    # The honest delta forgets a little; with zero tolerance the guard zeroes its real gain.
    strict = score_delta(evaluator, d, general_tolerance=0.0, domain_name="math")
    assert strict.code == GENERAL_REGRESSION and strict.value == 0.0, strict.reason
    assert strict.domain_lcb > 0
    huge = {k: 10 * v for k, v in d.items()}
    s = score_delta(evaluator, huge, general_tolerance=TOLERANCE, domain_name="math")
    assert s.value == 0.0 and s.code == GENERAL_REGRESSION, s.reason
    assert -s.general_mean > 5 * TOLERANCE  # measured: a 0.38-nat rise
