"""Expert selection: the ESFT scores and the per-layer cumulative threshold, on small inputs."""

import pytest

from protocol.moe.experts import (
    Assignment,
    gate_score,
    random_like,
    select,
    select_by_threshold,
    token_ratio,
)


def test_token_ratio_sums_to_one_per_layer():
    r = token_ratio([6, 2, 0, 4], tokens=6, top_k=2)
    assert r == [0.5, 2 / 12, 0.0, 4 / 12]
    assert sum(r) == pytest.approx(1.0)


def test_gate_score_is_mean_weight_per_token():
    assert gate_score([1.5, 0.5, 0.0], tokens=4) == [0.375, 0.125, 0.0]


def test_threshold_includes_the_expert_that_crosses_p():
    scores = [0.1, 0.4, 0.3, 0.2]
    assert select_by_threshold(scores, 0.4) == [1]
    assert select_by_threshold(scores, 0.41) == [1, 2]
    assert select_by_threshold(scores, 0.7) == [1, 2]
    assert select_by_threshold(scores, 0.71) == [1, 2, 3]
    assert select_by_threshold(scores, 1.0) == [0, 1, 2, 3]


def test_threshold_normalises_within_the_layer():
    # Scores that do not sum to 1 (e.g. gate scores) give the same choice as normalised ones.
    assert select_by_threshold([2.0, 8.0, 6.0, 4.0], 0.41) == select_by_threshold(
        [0.1, 0.4, 0.3, 0.2], 0.41
    )


def test_ties_break_by_expert_id():
    assert select_by_threshold([0.25, 0.25, 0.25, 0.25], 0.3) == [0, 1]


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="p must be"):
        select_by_threshold([1.0], 0)
    with pytest.raises(ValueError, match="zero"):
        select_by_threshold([0.0, 0.0], 0.2)
    with pytest.raises(ValueError):
        token_ratio([1], tokens=0, top_k=2)


def test_select_builds_a_hashable_assignment():
    a = select({0: [0.1, 0.9], 1: [0.5, 0.5]}, 0.2, "token-ratio", "ab" * 32, 2)
    assert a.layers == {0: (1,), 1: (0,)}
    assert a.num_selected() == 2
    same = select({1: [0.5, 0.5], 0: [0.1, 0.9]}, 0.2, "token-ratio", "ab" * 32, 2)
    assert same.hash() == a.hash()
    other = select({0: [0.1, 0.9], 1: [0.5, 0.5]}, 0.2, "gate-score", "ab" * 32, 2)
    assert other.hash() != a.hash()


def test_assignment_round_trip_and_tamper_detection(tmp_path):
    a = Assignment({0: (1, 5), 3: (2,)}, "gate-score", 0.1, "cd" * 32, 8, info={"note": "x"})
    path = tmp_path / "a.json"
    a.save(path)
    b = Assignment.load(path)
    assert b == a and b.hash() == a.hash()
    text = path.read_text().replace('"3": [\n      2\n    ]', '"3": [\n      3\n    ]')
    assert text != path.read_text()
    path.write_text(text)
    with pytest.raises(ValueError, match="hash mismatch"):
        Assignment.load(path)


@pytest.mark.parametrize(
    "layers, msg",
    [({}, "no layers"), ({0: ()}, "no experts"), ({0: (2, 1)}, "sorted"), ({0: (9,)}, "outside")],
)
def test_invalid_assignments(layers, msg):
    with pytest.raises(ValueError, match=msg):
        Assignment(layers, "token-ratio", 0.2, "ab" * 32, 8)


def test_random_like_keeps_counts_and_is_seeded():
    a = Assignment({0: (1, 5), 1: (0, 2, 7)}, "token-ratio", 0.2, "ab" * 32, 8)
    r1, r2 = random_like(a, 3), random_like(a, 3)
    assert r1 == r2
    assert {k: len(v) for k, v in r1.layers.items()} == {0: 2, 1: 3}
    assert r1.method == "random"


def test_select_excluding_another_tasks_experts_gives_disjoint_sets():
    scores = {0: [0.5, 0.3, 0.1, 0.1], 1: [0.1, 0.6, 0.2, 0.1]}
    math = select(scores, 0.5, "token-ratio", "ab" * 32, 4)
    assert math.layers == {0: (0,), 1: (1,)}
    code = select(scores, 0.5, "token-ratio", "ab" * 32, 4, exclude=[math])
    # Free relevance: layer 0 0.3, 0.1, 0.1 (0.3 / 0.5 >= 0.5); layer 1 0.1, 0.2, 0.1 (0.2 / 0.4).
    assert code.layers == {0: (1,), 1: (2,)}
    assert all(not set(code.layers[k]) & set(math.layers[k]) for k in scores)
    with pytest.raises(ValueError, match="taken by another task"):
        select({0: [1.0, 0.0]}, 0.5, "token-ratio", "ab" * 32, 2, exclude=[math])
    with pytest.raises(ValueError, match="for base"):
        select(scores, 0.5, "token-ratio", "cd" * 32, 4, exclude=[math])
