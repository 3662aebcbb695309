"""The model card (README.md) of a published checkpoint, as the Hugging Face hub shows it.

    facts = card_facts(context, outer)   # from the merger's round record (merger.node)
    text = model_card(facts)

Pure: the same facts give the same bytes (the card is part of the checkpoint's digest, so two
mergers exporting the same round must write the same card). It states the lineage (the task's
original base, the round, the checkpoint it builds on), every included delta (hotkey, artifact
sha256, this round's measured improvement, merge weight), the held-out losses against the
round's base on the guard's second batch set, the merge method and outer settings, and the
commands that recompute the weights from chain data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from protocol.artifact.merge_state import MERGE_STATE_FILE

TAGS = ("moesaic", "mixture-of-experts", "merge", "expert-fine-tuning")


def _measurements(merge: Mapping) -> dict[str, Mapping]:
    """Each single delta's selection-set measurement, over one task or several (compose)."""
    records = [merge, *(merge.get("tasks") or {}).values()]
    return {h: c for m in records for h, c in (m.get("candidates") or {}).items()}


def _heldout(merge: Mapping) -> dict | None:
    """The published candidate's and the base's losses: the guard's second set when the round
    had one (a single task), else the selection set (a composition of several tasks)."""
    guard, decision = merge.get("guard"), merge.get("decision")
    if guard is not None:
        name = "merged" if decision == "merged" else merge.get("best_single")
        c = guard["candidates"].get(name)
        if c is None:
            return None
        what = (
            "The guard's second batch set (drawn apart from the batches the deltas were chosen on)"
        )
        return dict(what=what, base_domain=guard["base_domain_mean"],
                    base_general=guard["base_general_mean"], domain=c["domain_mean"],
                    general=c.get("general_mean"))  # fmt: skip
    c = (merge.get("candidates") or {}).get(decision)
    if c is None:
        return None
    return dict(what="The first task's selection batches", base_domain=merge.get("base_domain_mean"),
                base_general=None, domain=c["domain_mean"], general=c.get("general_mean"))  # fmt: skip


def card_facts(context: Mapping, outer) -> dict:
    """The card's facts from the merger's context (round, state, chain, task_id, digests,
    built_on_round, method, base_model) and the outer optimizer the checkpoint carries."""
    merge = context["state"]["merge"]
    measured = _measurements(merge)
    included = [
        dict(hotkey=h, sha256=sha, weight=w, gain=measured.get(h, {}).get("domain_gain"),
             lcb=measured.get(h, {}).get("domain_lcb"))
        for h, sha, w in merge["included"]
    ]  # fmt: skip
    stepped = merge["decision"] == "merged" and context["method"] in ("diloco", "scaled")
    keys = ("round", "chain", "task_id", "original_base_digest", "round_base_digest")
    facts = {k: context[k] for k in (*keys, "built_on_round", "method", "base_model")}
    facts.update(decision=merge["decision"], reason=merge["reason"], included=included)
    facts.update(heldout=_heldout(merge), state_file=MERGE_STATE_FILE)
    facts["composed"] = bool(merge.get("tasks"))
    facts["cli_method"] = context["method"] if stepped else "average"
    facts["max_scale"] = context.get("max_scale")
    if outer is not None:
        facts["outer"] = dict(lr=outer.lr, momentum=outer.momentum, nesterov=outer.nesterov,
                              steps=outer.steps)  # fmt: skip
    return facts


def _num(x, digits: int = 6) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _front_matter(f: Mapping) -> list[str]:
    lines = ["---"]
    if f.get("base_model"):
        lines.append(f"base_model: {f['base_model']}")
    lines += ["library_name: transformers", "tags:"]
    lines += [f"- {t}" for t in TAGS]
    return [*lines, "---", ""]


def _lineage(f: Mapping) -> list[str]:
    built_on = (
        "the task's original base"
        if f["round_base_digest"] == f["original_base_digest"]
        else f"the checkpoint `{f['round_base_digest']}`"
    )
    return [
        "## Lineage",
        "",
        f"- original base (task {f['task_id']}): `{f['original_base_digest']}`",
        f"- round: {f['round']} (chain `{f['chain']}`)",
        f"- built on: {built_on}",
        f"- decision: {f['decision']} ({f['reason']})",
        "",
    ]


def _deltas(f: Mapping) -> list[str]:
    lines = [
        "## Included deltas",
        "",
        "Measured improvement: this round's domain loss gain over the round's base on the "
        "validators' batches (mean, and the lower confidence bound that scored it).",
        "",
        "| hotkey | artifact sha256 | gain (nats) | lower bound | weight |",
        "|---|---|---|---|---|",
    ]
    for d in f["included"]:
        lines.append(
            f"| `{d['hotkey']}` | `{d['sha256']}` | {_num(d.get('gain'))} | "
            f"{_num(d.get('lcb'))} | {_num(d['weight'])} |"
        )
    return [*lines, ""]


def _losses(f: Mapping) -> list[str]:
    h = f.get("heldout")
    if not h:
        return []
    rows = [("round's base", h["base_domain"], h["base_general"])]
    rows.append(("this checkpoint", h["domain"], h["general"]))
    lines = [
        "## Held-out losses",
        "",
        f"{h['what']} (mean loss per batch, nats).",
        "",
        "| model | domain | general |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {_num(d)} | {_num(g)} |" for name, d, g in rows]
    return [*lines, ""]


def _method(f: Mapping) -> list[str]:
    lines = ["## Merge", "", f"- method: `{f['method']}`"]
    outer = f.get("outer")
    if outer:
        lines.append(
            f"- DiLoCo outer step: lr {outer['lr']}, momentum {outer['momentum']}, "
            f"nesterov {str(outer['nesterov']).lower()}, steps taken: {outer['steps']}"
        )
    lines.append(
        "- the merge state (outer momentum, bf16 rounding remainder) is in "
        f"`{f['state_file']}`; the next round's merge continues from it"
    )
    return [*lines, ""]


def _recompute(f: Mapping) -> list[str]:
    if f.get("composed"):
        return [
            "## Recompute from chain data",
            "",
            "A composition of several tasks' experts: each task's included deltas (in the store "
            "under the digests above) are merged with `moesaic merge --weights` on the same base "
            "and the tasks' results joined with `moesaic compose`; no single command does both "
            "yet.",
            "",
        ]
    base = (
        "the task's original base"
        if f["round_base_digest"] == f["original_base_digest"]
        else f"`moesaic checkpoint pull --rpc RPC --registry REGISTRY --round "
        f"{f['built_on_round']} --out base`"
    )
    gets = [
        f"moesaic store get {d['sha256']} --sha256 {d['sha256']} --store STORE "
        f"--out delta-{i}.safetensors"
        for i, d in enumerate(f["included"])
    ]
    deltas = " ".join(f"--delta delta-{i}.safetensors" for i in range(len(f["included"])))
    weights = ",".join(repr(float(d["weight"])) for d in f["included"])  # exact: same bits
    merge = f"moesaic merge --base base --assignment ASSIGNMENT.json {deltas} --weights {weights}"
    merge += f" --method {f['cli_method']}"
    if f["cli_method"] == "scaled":
        merge += f" --max-scale {f['max_scale']}"
    if f["cli_method"] == "diloco":
        merge += f" --outer-lr {f['outer']['lr']} --outer-momentum {f['outer']['momentum']}"
    return [
        "## Recompute from chain data",
        "",
        f"1. The base: {base} (digest `{f['round_base_digest']}`).",
        "2. The included deltas, from the store under their committed digests:",
        "",
        "```",
        *gets,
        "```",
        "",
        "3. Merge them with their weights; the base's merge state is read from the base and "
        "the new one written beside the weights:",
        "",
        "```",
        merge + " --out recomputed",
        "```",
        "",
        "`recomputed/model.safetensors` and the merge state equal this checkpoint's bytes.",
        "",
    ]


def model_card(facts: Mapping) -> str:
    """README.md text of a checkpoint from `facts` (keys: see merger.node._card_facts)."""
    title = f"# moesaic checkpoint, task {facts['task_id']}, round {facts['round']}"
    lines = [*_front_matter(facts), title, ""]
    lines.append(
        "Merged by the moesaic merger from miners' fine-tuned expert deltas (only the experts "
        "of the task's assignment changed)."
    )
    lines.append("")
    for part in (_lineage, _deltas, _losses, _method, _recompute):
        lines += part(facts)
    return "\n".join(lines).rstrip("\n") + "\n"
