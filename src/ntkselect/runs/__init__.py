"""ntkselect.runs: run folders, what a run resolves once, the preflight, dry-run plans, sharded resumable work and its executors."""
