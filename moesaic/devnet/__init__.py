"""`moesaic devnet`: the whole network on one machine (anvil, blob server, every role a process).

procs.py starts and stops the servers by pid, clock.py produces blocks, summary.py reads the
run back into the summary table, run.py composes them.
"""
