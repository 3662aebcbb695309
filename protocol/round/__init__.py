"""One round of the protocol: the block schedule, manifests, submissions, scoring and per-round state."""
