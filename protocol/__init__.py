"""What every role shares, grouped by concern (docs/architecture.md draws how they depend).

- `protocol.moe`: the model side: load a MoE and find its fused experts, route and select the
  domain's experts (ESFT), train, evaluate, merge; data sources, corpora, tokenizer, demo base.
- `protocol.artifact`: what moves between roles as files: expert deltas and their wire
  encodings, the untrusted reader, copy-detection sketches, checkpoint export and transfer.
- `protocol.round`: one round of the protocol: the block schedule, signed manifests, fetching
  submissions, scoring, per-round resumable state and the checkpoint lineage.
- `protocol.identity`: keys and signatures, operator wallets, digests of exact bytes.
- `protocol.chain`, `protocol.storage`: the two outside boundaries, each an interface with real
  backends opened by one factory.
- `protocol.ops`: running a process: atomic writes, quiet logs, Prometheus metrics.
- `protocol.config`: the typed, torch-free TOML sections every role reads.

Nothing here imports a role or the CLI. Modules that need no torch do not import it, so
`moesaic --help` stays fast.
"""
