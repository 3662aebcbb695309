"""The miner role: fine-tunes a task's selected experts and ships their delta."""
