"""The validator role: verify each committed delta and score it on held-out data.

Role code over `protocol/` only:

- `validator.evaluate`: the evaluation engine (pure of chain and storage). The per-round eval
  seed (from the block hash at the commit deadline, unknown to miners while they train), the
  seeded held-out batches (`EvalSet`), an `Evaluator` that measures the base once and each delta
  applied in place and reverted, `score_delta` (paired lower confidence bound,
  general-regression guard), `similarities` for copy detection, and `evaluate_round`, which
  turns one round's files into an `Outcome` per hotkey.
- `validator.node`: the round as named steps over a chain and a store (collect, fetch,
  evaluate, score, set_weights), each persisted atomically so a killed validator finishes the
  round with the same result; `explain` for per-miner reasons.
"""
