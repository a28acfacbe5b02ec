"""ntkselect.runs: run folders, dry-run plans, sharded resumable work and its executors."""
