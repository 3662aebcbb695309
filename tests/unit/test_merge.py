"""Merging deltas (protocol.moe.merge), exporting checkpoints (protocol.artifact.export), `moesaic merge`."""

from __future__ import annotations

import json
import math

import pytest
import torch

from protocol.moe.merge import (
    DiLoCoOuter,
    compose,
    dare,
    normalise_weights,
    streamed_average,
    ties,
    weighted_average,
)


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


# ---- weighted average -------------------------------------------------------------------------


def test_weighted_average_exact_values():
    d1 = {"a": t(1.0, 2.0, -4.0), "b": torch.tensor([[0.0, 8.0]])}
    d2 = {"a": t(5.0, -2.0, 4.0), "b": torch.tensor([[4.0, 0.0]])}
    out = weighted_average([d1, d2], [1, 3])  # -> 0.25, 0.75
    assert torch.equal(out["a"], t(4.0, -1.0, 2.0))
    assert torch.equal(out["b"], torch.tensor([[3.0, 2.0]]))
    assert out["a"].dtype == torch.float32
    assert torch.equal(d1["a"], t(1.0, 2.0, -4.0))  # inputs untouched


def test_weighted_average_accumulates_in_float32_and_defaults_to_equal():
    d1 = {"a": torch.tensor([1.0, 3.0], dtype=torch.bfloat16)}
    d2 = {"a": torch.tensor([2.0, 0.0], dtype=torch.bfloat16)}
    out = weighted_average([d1, d2])
    assert out["a"].dtype == torch.float32
    assert torch.equal(out["a"], t(1.5, 1.5))


def test_zero_weight_contributor_is_ignored():
    out = weighted_average([{"a": t(1.0)}, {"a": t(100.0)}], [2.0, 0.0])
    assert torch.equal(out["a"], t(1.0))


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ([1.0], "2 deltas"),
        ([0.0, 0.0], "all weights are zero"),
        ([1.0, -1.0], ">= 0"),
        ([1.0, float("nan")], "finite"),
    ],
)
def test_weight_validation(weights, match):
    with pytest.raises(ValueError, match=match):
        weighted_average([{"a": t(1.0)}, {"a": t(2.0)}], weights)


def test_normalise_weights():
    assert normalise_weights([1, 1, 2], 3) == [0.25, 0.25, 0.5]
    assert normalise_weights(None, 4) == [0.25] * 4
    with pytest.raises(ValueError, match="no deltas"):
        normalise_weights(None, 0)


def _random_deltas(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"l.0.e.3.up": (6, 4), "l.0.e.1.down": (4, 6), "l.1.e.0.gate": (5,)}
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    return [
        {k: torch.randn(shape, generator=g).to(dtypes[i % 3]) for k, shape in shapes.items()}
        for i in range(n)
    ]


@pytest.mark.parametrize("weights", [[1, 1, 1, 1], [0.3, 0.0, 2.0, 0.7], [5e-3, 1.0, 1e3, 7.0]])
def test_streamed_average_is_bit_identical_to_weighted_average(weights):
    deltas = _random_deltas(len(weights), seed=len(str(weights)))
    expected = weighted_average(deltas, weights)
    got = streamed_average(iter(deltas), weights)
    assert list(got) == list(expected)  # sorted keys, like weighted_average
    for k in expected:
        assert got[k].dtype == torch.float32 and torch.equal(got[k], expected[k]), k


def test_streamed_average_holds_one_delta_at_a_time():
    import gc
    import weakref

    gc.disable()  # only reference counting frees: a delta kept alive by mistake stays visible
    try:
        alive: list[weakref.ref] = []
        most = 0

        def produce():
            nonlocal most
            for i in range(4):
                d = _random_deltas(1, seed=i)[0]  # made here: the producer keeps none
                most = max(most, sum(r() is not None for r in alive))
                alive.append(weakref.ref(d["l.0.e.3.up"]))
                yield d
                del d

        streamed_average(produce(), [1, 2, 3, 4])
        assert most == 0  # no earlier delta was alive when the next one was produced
        assert alive and all(r() is None for r in alive)
    finally:
        gc.enable()


def test_streamed_average_refuses_what_weighted_average_refuses():
    with pytest.raises(ValueError, match="different experts"):
        streamed_average(iter([{"a": t(1.0)}, {"b": t(1.0)}]), [1, 1])
    with pytest.raises(ValueError, match="shape"):
        streamed_average(iter([{"a": t(1.0)}, {"a": t(1.0, 2.0)}]), [1, 1])
    with pytest.raises(ValueError, match="got 1 deltas for 2 weights"):
        streamed_average(iter([{"a": t(1.0)}]), [1, 1])
    with pytest.raises(ValueError, match="more deltas than the 1 weights"):
        streamed_average(iter([{"a": t(1.0)}, {"a": t(2.0)}]), [1])
    with pytest.raises(ValueError, match="all weights are zero"):
        streamed_average(iter([{"a": t(1.0)}]), [0.0])


def test_key_set_and_shape_mismatch_refused():
    with pytest.raises(ValueError, match="different experts"):
        weighted_average([{"a": t(1.0)}, {"b": t(1.0)}], [1, 1])
    with pytest.raises(ValueError, match="shape"):
        weighted_average([{"a": t(1.0)}, {"a": t(1.0, 2.0)}], [1, 1])


# ---- TIES / DARE ------------------------------------------------------------------------------


def test_ties_sign_election_and_disjoint_mean():
    d1 = {"x": t(3.0, -1.0, 2.0, 0.0, 1.0)}
    d2 = {"x": t(2.0, -2.0, 2.0, 5.0, -1.0)}
    d3 = {"x": t(-4.0, 4.0, -6.0, 0.0, 0.0)}
    # summed mass [1, 1, -2, 5, 0] -> signs [+, +, -, +, none]; mean of the agreeing entries
    out = ties([d1, d2, d3], density=1.0)
    assert torch.equal(out["x"], t(2.5, 4.0, -6.0, 5.0, 0.0))


def test_ties_trims_before_electing():
    d1 = {"x": t(0.5, 6.0, 5.0, 0.1, 0.2)}
    d2 = {"x": t(-0.4, 0.1, 0.1, -0.3, 0.05)}
    # top 40 % (2 of 5): d1 keeps 6, 5; d2 keeps -0.4, -0.3, so coordinate 0 elects "-"
    out = ties([d1, d2], density=0.4)
    assert torch.equal(out["x"], t(-0.4, 6.0, 5.0, -0.3, 0.0))
    assert ties([d1, d2], density=1.0)["x"][0] == 0.5  # untrimmed, "+" wins


def test_ties_weights_change_the_election():
    d1, d2 = {"x": t(1.0)}, {"x": t(-2.0)}
    assert torch.equal(ties([d1, d2], density=1.0)["x"], t(-2.0))
    assert torch.equal(ties([d1, d2], [3, 1], density=1.0)["x"], t(1.0))
    with pytest.raises(ValueError, match="density"):
        ties([d1, d2], density=0.0)


def test_dare_is_deterministic_and_unbiased():
    deltas = [{"w": torch.ones(200, 200)}, {"w": 3 * torch.ones(200, 200)}]
    a = dare(deltas, [1, 1], drop=0.9, seed=7)["w"]
    assert torch.equal(a, dare(deltas, [1, 1], drop=0.9, seed=7)["w"])
    assert not torch.equal(a, dare(deltas, [1, 1], drop=0.9, seed=8)["w"])
    # each entry is 0.5 * (0 or 10) + 0.5 * (0 or 30); the mean stays near the average, 2
    assert set(a.unique().tolist()) <= {0.0, 5.0, 15.0, 20.0}
    assert abs(a.mean().item() - 2.0) < 0.1
    kept = (dare(deltas[:1], drop=0.9, seed=7)["w"] != 0).float().mean().item()
    assert abs(kept - 0.1) < 0.01


def test_dare_masks_do_not_depend_on_key_order_and_drop_zero_is_average():
    x, y = torch.randn(30, 30), torch.randn(4, 4)
    ab = dare([{"a": x, "b": y}], drop=0.5, seed=1)
    ba = dare([{"b": y, "a": x}], drop=0.5, seed=1)
    assert torch.equal(ab["a"], ba["a"]) and torch.equal(ab["b"], ba["b"])
    deltas = [{"a": x}, {"a": 2 * x}]
    assert torch.equal(dare(deltas, [1, 3], drop=0.0)["a"], weighted_average(deltas, [1, 3])["a"])
    with pytest.raises(ValueError, match="drop"):
        dare(deltas, drop=1.0)


# ---- DiLoCo outer optimizer -------------------------------------------------------------------


def test_diloco_lr1_momentum0_is_plain_averaging():
    outer = DiLoCoOuter(lr=1.0, momentum=0.0)
    torch.manual_seed(0)
    for _ in range(3):
        deltas = [{"a": torch.randn(5, 3), "b": torch.randn(2)} for _ in range(3)]
        avg = weighted_average(deltas, [1, 2, 3])
        update = outer.step(avg)
        assert update.keys() == avg.keys()
        assert all(torch.equal(update[k], avg[k]) for k in avg)
    assert outer.steps == 3


def test_diloco_nesterov_two_steps_by_hand():
    outer = DiLoCoOuter(lr=0.5, momentum=0.5)
    # g1 = -1: m = -1, update = -0.5 * (-1 + 0.5 * -1) = 0.75
    assert torch.equal(outer.step({"a": t(1.0)})["a"], t(0.75))
    # g2 = -2: m = 0.5 * -1 - 2 = -2.5, update = -0.5 * (-2 + 0.5 * -2.5) = 1.625
    assert torch.equal(outer.step({"a": t(2.0)})["a"], t(1.625))
    assert torch.equal(outer.buffers["a"], t(-2.5))


def test_diloco_defaults_and_plain_momentum():
    outer = DiLoCoOuter()  # lr 0.7, momentum 0.9: update = 0.7 * (1 + 0.9) on the first step
    assert torch.allclose(outer.step({"a": t(1.0)})["a"], t(1.33))
    heavy = DiLoCoOuter(lr=0.5, momentum=0.5, nesterov=False)
    assert torch.equal(heavy.step({"a": t(1.0)})["a"], t(0.5))
    assert torch.equal(heavy.step({"a": t(2.0)})["a"], t(1.25))


def test_diloco_absent_keys_keep_their_buffer_and_shapes_are_checked():
    outer = DiLoCoOuter(lr=1.0, momentum=0.5)
    outer.step({"a": t(1.0), "b": t(4.0)})
    update = outer.step({"a": t(1.0)})
    assert set(update) == {"a"} and torch.equal(outer.buffers["b"], t(-4.0))
    with pytest.raises(ValueError, match="momentum buffer"):
        outer.step({"a": t(1.0, 2.0)})
    for bad in ({"lr": 0.0}, {"momentum": 1.0}, {"momentum": -0.1}):
        with pytest.raises(ValueError, match="outer"):
            DiLoCoOuter(**bad)


def test_diloco_state_round_trip(tmp_path):
    outer = DiLoCoOuter(lr=0.7, momentum=0.9)
    torch.manual_seed(1)
    outer.step({"a": torch.randn(4, 3), "b": torch.randn(6)})
    path = tmp_path / "outer.safetensors"
    outer.save(path)
    loaded = DiLoCoOuter.load(path)
    assert loaded.meta() == outer.meta() and loaded.steps == 1
    assert all(torch.equal(loaded.buffers[k], outer.buffers[k]) for k in outer.buffers)
    assert outer.state_dict()["buffers"].keys() == {"a", "b"}
    nxt = {"a": torch.randn(4, 3), "b": torch.randn(6)}
    u1, u2 = outer.step(nxt), loaded.step(nxt)
    assert all(torch.equal(u1[k], u2[k]) for k in nxt)


def test_diloco_load_refuses_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": t(1.0)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="moesaic-outer-state"):
        DiLoCoOuter.load(tmp_path / "plain.safetensors")
    (tmp_path / "junk").write_bytes(b"not safetensors at all")
    with pytest.raises(ValueError, match="safetensors"):
        DiLoCoOuter.load(tmp_path / "junk")


# ---- compose ----------------------------------------------------------------------------------


def test_compose_disjoint_is_exact_union():
    a, b = {"l0.e1": t(1.0, 2.0)}, {"l0.e2": t(-3.0), "l1.e0": t(0.25)}
    out = compose([a, b])
    assert list(out) == ["l0.e1", "l0.e2", "l1.e0"]
    assert torch.equal(out["l0.e1"], a["l0.e1"]) and torch.equal(out["l1.e0"], b["l1.e0"])


def test_compose_overlap_refused_unless_averaged():
    a, b = {"k1": t(1.0), "k2": t(2.0)}, {"k2": t(4.0), "k3": t(5.0)}
    with pytest.raises(ValueError, match=r"k2.*overlap='average'"):
        compose([a, b])
    out = compose([a, b], overlap="average")
    assert torch.equal(out["k2"], t(3.0)) and torch.equal(out["k1"], t(1.0))
    with pytest.raises(ValueError, match="overlap must be"):
        compose([a, b], overlap="sum")


# ---- export -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(random_moe_dir):
    from protocol.moe.model import expert_layout, load_model

    model = load_model(random_moe_dir)
    return model, expert_layout(model)


def expert_delta(layout, assignment, seed=0, scale=0.01):
    g = torch.Generator().manual_seed(seed)
    return {
        layout.expert_key(layer, e, p): scale * torch.randn(layout.proj_shape(p), generator=g)
        for layer, e in assignment.pairs()
        for p in ("gate_proj", "up_proj", "down_proj")
    }


def assert_exported(out_dir, base_model, layout, assignment, delta):
    """Assigned experts == base + delta exactly; every other tensor bit-identical to the base."""
    from transformers import AutoModelForCausalLM

    from protocol.moe.model import expert_slices

    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    chosen = set(assignment.pairs())
    for layer in layout.moe_layers:
        for e in range(layout.num_experts):
            got = expert_slices(model, layout, layer, e)
            want = expert_slices(base_model, layout, layer, e)
            for p in ("gate_proj", "up_proj", "down_proj"):
                exp = (
                    want[p] + delta[layout.expert_key(layer, e, p)]
                    if (layer, e) in chosen
                    else want[p]
                )
                assert torch.equal(got[p], exp), (layer, e, p)
    base_sd = base_model.state_dict()
    for name, tensor in model.state_dict().items():
        if ".mlp.experts." not in name:
            assert torch.equal(tensor, base_sd[name]), name


def test_export_checkpoint_applies_delta_exactly(tmp_path, random_moe_dir, random_assignment, base):
    from protocol.artifact.export import export_checkpoint
    from protocol.identity.hashing import sha256_dir

    model, layout = base
    delta = expert_delta(layout, random_assignment)
    out = tmp_path / "merged"
    digest = export_checkpoint(random_moe_dir, delta, out, info={"deltas": ["a.safetensors"]})
    assert digest == sha256_dir(out) != sha256_dir(random_moe_dir)
    assert_exported(out, model, layout, random_assignment, delta)
    meta = json.loads((out / "moesaic.json").read_text())
    assert meta["base_hash"] == sha256_dir(random_moe_dir)
    assert meta["experts"] == [list(p) for p in random_assignment.pairs()]
    assert meta["info"] == {"deltas": ["a.safetensors"]}
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no temporary left behind

    with pytest.raises(ValueError, match="not empty"):
        export_checkpoint(random_moe_dir, delta, out)
    delta2 = expert_delta(layout, random_assignment, seed=1)
    export_checkpoint(random_moe_dir, delta2, out, overwrite=True)
    assert_exported(out, model, layout, random_assignment, delta2)
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_export_refuses_bad_deltas_and_cleans_up(
    tmp_path, random_moe_dir, random_assignment, base, monkeypatch
):
    import protocol.artifact.export as export

    _, layout = base
    delta = expert_delta(layout, random_assignment)
    key = next(iter(delta))
    with pytest.raises(ValueError, match="not experts of this base"):
        export.export_checkpoint(
            random_moe_dir, {"model.embed_tokens.weight": delta[key]}, tmp_path / "o"
        )
    with pytest.raises(ValueError, match="shape"):
        export.export_checkpoint(random_moe_dir, {key: delta[key].T}, tmp_path / "o")
    with pytest.raises(ValueError, match="NaN"):
        export.export_checkpoint(random_moe_dir, {key: delta[key] * float("nan")}, tmp_path / "o")

    def boom(root):
        raise OSError("disk full")

    monkeypatch.setattr(export, "fsync_tree", boom)
    with pytest.raises(OSError, match="disk full"):
        export.export_checkpoint(random_moe_dir, delta, tmp_path / "o")
    assert list(tmp_path.iterdir()) == []


# ---- CLI --------------------------------------------------------------------------------------


def write_delta(path, tensors, base_dir, assignment):
    from safetensors.torch import save_file

    from protocol.identity.hashing import sha256_dir

    meta = {
        "format": "moesaic-delta",
        "format_version": 2,
        "base_hash": sha256_dir(base_dir),
        "assignment_hash": assignment.hash(),
        "round": 0,
        "tokens": 0,
        "shard": "0" * 64,
        "encoding": "float32",
    }
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        path,
        metadata={"moesaic": json.dumps(meta)},
    )


def test_cli_merge_average(tmp_path, random_moe_dir, random_assignment, base, capsys):
    from moesaic.cli import main

    model, layout = base
    a_path = tmp_path / "assignment.json"
    random_assignment.save(a_path)
    d1, d2 = expert_delta(layout, random_assignment, 1), expert_delta(layout, random_assignment, 2)
    write_delta(tmp_path / "d1.safetensors", d1, random_moe_dir, random_assignment)
    write_delta(tmp_path / "d2.safetensors", d2, random_moe_dir, random_assignment)
    out = tmp_path / "merged"
    argv = ["merge", "--base", str(random_moe_dir), "--assignment", str(a_path)]
    argv += [
        "--delta",
        str(tmp_path / "d1.safetensors"),
        "--delta",
        str(tmp_path / "d2.safetensors"),
    ]
    rc = main([*argv, "--weights", "1,3", "--method", "average", "--out", str(out)])
    assert rc == 0
    from protocol.identity.hashing import sha256_dir

    assert capsys.readouterr().out.split() == [str(out), sha256_dir(out)]
    assert_exported(out, model, layout, random_assignment, weighted_average([d1, d2], [1, 3]))
    info = json.loads((out / "moesaic.json").read_text())["info"]
    assert info["method"] == "average" and info["weights"] == [0.25, 0.75]
    assert [d["file"] for d in info["deltas"]] == ["d1.safetensors", "d2.safetensors"]

    # a weight count that does not match the deltas is a one-line error, exit 2
    assert main([*argv, "--weights", "1", "--out", str(tmp_path / "x")]) == 2
    assert "2 deltas" in capsys.readouterr().err

    # the daemon's default, "scaled": the average times sqrt(N_eff) (1 / (1/16 + 9/16) = 1.6)
    out = tmp_path / "scaled"
    assert main([*argv, "--weights", "1,3", "--method", "scaled", "--out", str(out)]) == 0
    factor = math.sqrt(1 / (0.25**2 + 0.75**2))
    expected = {k: v * factor for k, v in weighted_average([d1, d2], [1, 3]).items()}
    assert_exported(out, model, layout, random_assignment, expected)


def test_cli_merge_diloco_keeps_outer_state(tmp_path, random_moe_dir, random_assignment, base):
    from moesaic.cli import main

    model, layout = base
    a_path = tmp_path / "assignment.json"
    random_assignment.save(a_path)
    d1, d2 = expert_delta(layout, random_assignment, 3), expert_delta(layout, random_assignment, 4)
    write_delta(tmp_path / "d1.safetensors", d1, random_moe_dir, random_assignment)
    write_delta(tmp_path / "d2.safetensors", d2, random_moe_dir, random_assignment)
    state = tmp_path / "outer.safetensors"
    argv = ["merge", "--base", str(random_moe_dir), "--assignment", str(a_path), "--method"]
    argv += ["diloco", "--outer-lr", "0.5", "--outer-momentum", "0.5", "--outer-state", str(state)]
    argv += [
        "--delta",
        str(tmp_path / "d1.safetensors"),
        "--delta",
        str(tmp_path / "d2.safetensors"),
    ]
    reference = DiLoCoOuter(lr=0.5, momentum=0.5)
    for step in (1, 2):
        out = tmp_path / f"round{step}"
        assert main([*argv, "--out", str(out)]) == 0
        expected = reference.step(weighted_average([d1, d2]))
        assert_exported(out, model, layout, random_assignment, expected)
        assert DiLoCoOuter.load(state).steps == step
    # momentum buffers belong to diloco only: a one-line error, exit 2
    assert main([*argv, "--method", "average", "--out", str(tmp_path / "x")]) == 2


def test_cli_compose_disjoint_tasks(tmp_path, random_moe_dir, random_assignment, base, capsys):
    from moesaic.cli import main
    from protocol.moe.experts import Assignment

    model, layout = base
    tasks = {"math": {0: (1, 5)}, "code": {1: (0, 2, 7)}, "clash": {0: (5, 6)}}
    args, deltas = {}, {}
    for seed, (name, layers) in enumerate(tasks.items()):
        a = Assignment(layers, "token-ratio", 0.2, random_assignment.model_hash, 8)
        a.save(tmp_path / f"{name}.json")
        deltas[name] = expert_delta(layout, a, seed)
        write_delta(tmp_path / f"{name}.safetensors", deltas[name], random_moe_dir, a)
        args[name] = ["--task", f"{tmp_path / name}.json:{tmp_path / name}.safetensors"]
    argv = ["compose", "--base", str(random_moe_dir)]
    out = tmp_path / "composed"
    assert main([*argv, *args["math"], *args["code"], "--out", str(out)]) == 0
    # math + code cover exactly random_assignment's experts, so the union is one delta over it
    union = {**deltas["math"], **deltas["code"]}
    assert_exported(out, model, layout, random_assignment, union)
    capsys.readouterr()
    assert main([*argv, *args["math"], *args["clash"], "--out", str(tmp_path / "y")]) == 2
    assert "mlp.experts.5." in capsys.readouterr().err and not (tmp_path / "y").exists()


def test_contributor_scale_is_sqrt_of_the_effective_count_capped():
    from protocol.moe.merge import contributor_scale

    assert contributor_scale([1.0], 4.0) == 1.0
    assert contributor_scale([1, 1, 1, 1], 4.0) == pytest.approx(2.0)
    assert contributor_scale([3, 1], 4.0) == pytest.approx(math.sqrt(1 / (0.75**2 + 0.25**2)))
    assert contributor_scale([1.0] * 100, 4.0) == 4.0  # capped
    assert contributor_scale([1.0, 0.0], 4.0) == 1.0  # a zero weight adds no contributor
    for bad in (0.5, math.inf, math.nan):
        with pytest.raises(ValueError, match="cap"):
            contributor_scale([1, 1], bad)


def test_scaled_multiplies_in_float32_without_touching_the_input():
    from protocol.moe.merge import scaled

    d = {"k": torch.tensor([1.0, -2.0], dtype=torch.bfloat16)}
    out = scaled(d, 2.0)
    assert out["k"].dtype == torch.float32 and out["k"].tolist() == [2.0, -4.0]
    assert d["k"].tolist() == [1.0, -2.0]
    with pytest.raises(ValueError, match="finite"):
        scaled(d, math.nan)
