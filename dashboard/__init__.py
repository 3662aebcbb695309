"""The operator dashboard and run reports: what the network did each round, and why.

- `dashboard.state`: read miner, validator and merger state directories (their per-round JSON)
  and the chain into one JSON-able snapshot.
- `dashboard.svg`: small inline-SVG charts (no JavaScript, no network: the page is one file).
- `dashboard.page`: the snapshot as an HTML page.
- `dashboard.app`: the starlette app `moesaic dashboard` serves with uvicorn on 127.0.0.1.
- `dashboard.report`: PNG plots for `moesaic report --out DIR` (matplotlib, Agg backend).

Torch-free.
"""
