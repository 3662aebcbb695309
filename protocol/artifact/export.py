"""Export a merged checkpoint: base model + expert delta, saved as a normal HF directory.

`export_checkpoint` loads the base, adds the delta into the fused expert tensors, saves with
`save_pretrained` into a temporary sibling of the target, copies the tokenizer files, writes
`moesaic.json` (provenance), and renames the directory into place: readers see no checkpoint
or a complete one, never half. The result loads with `AutoModelForCausalLM.from_pretrained`.

With a `merge_state` (protocol.artifact.merge_state) the export also carries the merge's state in
the checkpoint: its outer optimizer, and the remainder that rounding into a low-precision base
(bf16) left, which the state given adds back first (error feedback: over rounds the checkpoint
tracks the sum of the updates to within one ulp, where plain rounding drops every update below
half an ulp). `files` adds small files (the model card, README.md) to the directory.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoConfig

from protocol.artifact.merge_state import MERGE_STATE_FILE, MergeState
from protocol.identity.hashing import sha256_dir
from protocol.moe.model import EXPERT_PROJS, ExpertLayout, expert_layout, expert_slices, load_model
from protocol.ops.atomic import check_target, fsync_tree, install_dir

if TYPE_CHECKING:
    from torch import nn

CHECKPOINT_FORMAT = "moesaic-checkpoint"
CHECKPOINT_VERSION = 1
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


def _locate(layout: ExpertLayout, deltas: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """Map each hub key to (layer, expert, proj); refuse unknown keys, bad shapes, non-finite."""
    index = {
        layout.expert_key(layer, e, p): (layer, e, p)
        for layer in layout.moe_layers
        for e in range(layout.num_experts)
        for p in EXPERT_PROJS
    }
    unknown = sorted(set(deltas) - set(index))
    if unknown:
        raise ValueError(
            f"{len(unknown)} delta keys are not experts of this base (e.g. {unknown[:3]}); "
            f"expected keys like {layout.expert_key(layout.moe_layers[0], 0, 'gate_proj')}"
        )
    for key, d in deltas.items():
        want = layout.proj_shape(index[key][2])
        if tuple(d.shape) != want:
            raise ValueError(f"{key}: delta shape {tuple(d.shape)}, base expects {want}")
        if not torch.isfinite(d).all():
            raise ValueError(f"{key}: delta has NaN or infinite values")
    return {k: index[k] for k in deltas}


def add_expert_delta_(model: nn.Module, layout: ExpertLayout, deltas: dict) -> list[list[int]]:
    """Add each hub-key delta into its slice of the fused tensors, in place (float32 sum).

    Everything is validated before the first write. Returns the sorted [layer, expert] pairs
    that changed.
    """
    return add_with_remainder_(model, layout, deltas, {})[0]


def add_with_remainder_(
    model: nn.Module, layout: ExpertLayout, deltas: dict, carried: dict
) -> tuple[list[list[int]], dict[str, torch.Tensor]]:
    """Add `deltas` plus the `carried` remainder of an earlier export into the fused tensors, in
    place; return (changed [layer, expert] pairs of `deltas`, the new float32 remainder).

    Per key the exact float32 value (weight + delta + carried) is rounded to the weights' dtype;
    the remainder is exact - rounded, kept for keys whose dtype is not float32 (a float32 base
    rounds nothing). Every key of both maps is validated before the first write.
    """
    where = _locate(layout, deltas)
    where_carried = _locate(layout, carried)
    remainder = {}
    with torch.no_grad():
        for key in sorted(set(where) | set(where_carried)):
            layer, expert, proj = where.get(key) or where_carried[key]
            view = expert_slices(model, layout, layer, expert)[proj]
            exact = view.to(torch.float32)  # a new tensor unless the weights are float32
            for part in (deltas.get(key), carried.get(key)):
                if part is not None:
                    exact = exact + part.to(device=view.device, dtype=torch.float32)
            rounded = exact.to(view.dtype)
            if view.dtype != torch.float32:
                remainder[key] = (exact - rounded.to(torch.float32)).cpu()
            view.copy_(rounded)
    return sorted({(layer, e) for layer, e, _ in where.values()}), remainder


def _base_dtype(base_dir: str | Path) -> str:
    """The dtype the base config declares (float32 when it declares none)."""
    cfg = AutoConfig.from_pretrained(str(base_dir))
    declared = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    return str(declared).removeprefix("torch.") if declared else "float32"


def export_checkpoint(
    base_dir: str | Path,
    deltas: dict[str, torch.Tensor],
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    info: dict | None = None,
    overwrite: bool = False,
    base_hash: str | None = None,
    merge_state: MergeState | None = None,
    files: dict[str, bytes] | None = None,
) -> str:
    """Write base + delta to `out_dir` as a HF checkpoint; return sha256_dir(out_dir).

    `dtype` (e.g. "bfloat16") defaults to the base config's. `info` (e.g. the list of merged
    delta files and the method) is stored in moesaic.json with the base hash and the changed
    experts. `base_hash` skips re-hashing a base the caller already hashed. `merge_state`: its
    residual is added (error feedback) and it is written, with the new residual, as
    MERGE_STATE_FILE (module doc). `files`: name -> bytes written into the directory. A failure
    leaves `out_dir` as it was.
    """
    base, out = Path(base_dir), Path(out_dir)
    check_target(out, overwrite)
    extra = dict(files or {})
    if MERGE_STATE_FILE in extra or any("/" in n or n.startswith(".") for n in extra):
        raise ValueError(
            f"files: plain visible names other than {MERGE_STATE_FILE}: {sorted(extra)}"
        )
    base_hash = base_hash or sha256_dir(base)
    model = load_model(base, dtype=dtype or _base_dtype(base))
    layout = expert_layout(model)
    carried = merge_state.residual if merge_state is not None else {}
    changed, remainder = add_with_remainder_(model, layout, deltas, carried)
    if merge_state is not None:
        extra[MERGE_STATE_FILE] = MergeState(merge_state.outer, remainder).to_bytes()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        model.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            if (base / name).is_file():
                shutil.copyfile(base / name, tmp / name)
        provenance = {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_VERSION,
            "base_hash": base_hash,
            "experts": [list(pair) for pair in changed],
            "info": info or {},
        }
        (tmp / "moesaic.json").write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
        for name, blob in sorted(extra.items()):
            (tmp / name).write_bytes(blob)
        fsync_tree(tmp)
        install_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sha256_dir(out)
