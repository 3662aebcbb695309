"""The model side: MoE layout, routing, expert selection, training, evaluation, merging and data."""
