"""The miner's inner optimizer state kept across rounds (`[miner.train] keep_optimizer`).

Every round trains fresh deltas on a new base (the latest merged checkpoint), but the AdamW
moment estimates of the round before still describe the same experts' loss surface: a miner
that keeps them starts each round with momentum instead of from zero, as one long run would.

    keeper = OptimizerKeeper(Path("runs/miner0/rounds"), round=5, assignment_hash=a.hash())
    opt = adamw(params, cfg)
    keeper.load(opt, params)        # round 4's state (or the latest before 5), if it fits
    train_loop(..., optimizer=opt)
    keeper.save(opt, params)        # rounds/optimizer.5.pt, atomically

Why one file per round, and read only from earlier rounds: a miner killed after saving round
r's state but before recording round r's delta trains round r again, and must start from the
same state as the first time (round r - 1's), not from the one its killed run produced. A kill
during the save leaves the earlier file whole (protocol.ops.atomic). Only the file a round
loaded from and the one it wrote are kept. The state is refused (and a fresh AdamW used, with
the reason logged) when it was kept for another assignment, its parameter shapes differ, or
the file cannot be read.
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from protocol.ops.atomic import write_bytes_atomic

log = logging.getLogger("moesaic.miner")

STATE_VERSION = 1
_NAME = re.compile(r"optimizer\.(\d+)\.pt")


def mismatch(saved, params: list[torch.Tensor], assignment_hash: str) -> str | None:
    """Why a kept state cannot seed an optimizer over `params` for this assignment, or None."""
    if not isinstance(saved, dict) or saved.get("version") != STATE_VERSION:
        return f"not a version-{STATE_VERSION} optimizer state"
    if saved.get("assignment_hash") != assignment_hash:
        return (
            f"kept for assignment {str(saved.get('assignment_hash'))[:16]}, this round trains "
            f"{assignment_hash[:16]}"
        )
    shapes = [list(p.shape) for p in params]
    if saved.get("shapes") != shapes:
        return f"parameter shapes {saved.get('shapes')} differ from this round's {shapes}"
    return None


@dataclass(frozen=True)
class OptimizerKeeper:
    """Where and for what one round's optimizer state is loaded from and saved to."""

    directory: Path
    round: int
    assignment_hash: str

    def path(self, rnd: int) -> Path:
        return self.directory / f"optimizer.{rnd}.pt"

    def _kept_rounds(self) -> list[int]:
        found = (_NAME.fullmatch(p.name) for p in self.directory.glob("optimizer.*.pt"))
        return sorted(int(m[1]) for m in found if m)

    def previous(self) -> int | None:
        """The latest round before this one whose state is kept, or None."""
        earlier = [r for r in self._kept_rounds() if r < self.round]
        return earlier[-1] if earlier else None

    def load(self, opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> bool:
        """Seed `opt` (built over `params` with today's settings) with the latest earlier
        round's state if it fits; False (and why, logged) when it starts fresh."""
        q = self.previous()
        if q is None:
            log.info("round %d: no kept optimizer state; a fresh AdamW", self.round)
            return False
        try:
            saved = torch.load(self.path(q), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 (any unreadable file: train fresh, say why)
            saved, problem = None, f"unreadable ({type(e).__name__}: {str(e)[:120]})"
        else:
            problem = mismatch(saved, params, self.assignment_hash)
        if problem is not None:
            log.warning(
                "round %d: optimizer state of round %d not used (%s); a fresh AdamW",
                self.round, q, problem,
            )  # fmt: skip
            return False
        # The moments carry over; the hyper-parameters are today's settings, not the saved ones.
        today = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        opt.load_state_dict(saved["optimizer"])
        for group, settings in zip(opt.param_groups, today, strict=True):
            group.update(settings)
        log.info("round %d: optimizer state of round %d loaded", self.round, q)
        return True

    def save(self, opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> Path:
        """Write this round's state atomically; drop kept states older than the one loaded."""
        data = {
            "version": STATE_VERSION,
            "round": self.round,
            "assignment_hash": self.assignment_hash,
            "shapes": [list(p.shape) for p in params],
            "optimizer": opt.state_dict(),
        }
        buffer = io.BytesIO()
        torch.save(data, buffer)
        out = self.path(self.round)
        write_bytes_atomic(out, buffer.getvalue())
        q = self.previous()
        for r in self._kept_rounds():
            if r < self.round and r != q:
                self.path(r).unlink(missing_ok=True)
        return out
