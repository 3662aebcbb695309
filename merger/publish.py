"""The checkpoint a merger round publishes: base + the chosen delta, exported with the merge
state it carries (protocol.artifact.merge_state: the DiLoCo outer optimizer and the bf16
remainder, added back here) and its model card (merger.card)."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from merger.card import card_facts, model_card
from merger.outer import outer_published
from protocol.artifact.export import export_checkpoint
from protocol.artifact.merge_state import MergeState, read_merge_state
from protocol.ops.atomic import remove_stale_temps


def export_round(state_dir: Path, state: dict, settings, base_dir: Path, context: dict) -> Path:
    """`state_dir/checkpoints/<r>`, exported once: one installed by a killed run is complete
    (atomic). `state`: the round's record; `settings`: MergerSettings; `context`: what the card
    needs beyond the record (merger.card.card_facts), with round_base_digest = the base's."""
    r, merged = state["round"], state["merge"]
    out = Path(state_dir) / "checkpoints" / str(r)
    if out.exists():
        return out
    remove_stale_temps(out)  # a whole checkpoint's worth, if an export was killed
    info = {"round": r, "decision": merged["decision"], "included": merged["included"]}
    info["method"] = settings.method
    delta = load_file(str(Path(state_dir) / merged["delta_path"]))
    carried = read_merge_state(base_dir)
    outer = None
    if settings.method == "diloco":
        lr, momentum = settings.outer_lr, settings.outer_momentum
        outer = outer_published(state_dir, r, base_dir, lr, momentum)
    merge_state = MergeState(outer, carried.residual if carried else {})
    card = model_card(card_facts({**context, "state": state}, outer)).encode()
    export_checkpoint(
        base_dir, delta, out, info=info, base_hash=context["round_base_digest"],
        merge_state=merge_state, files={"README.md": card},
    )  # fmt: skip
    return out
