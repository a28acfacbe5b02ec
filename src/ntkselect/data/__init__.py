"""ntkselect.data.records: reading, tokenising and batching records, the demo data, the leak check."""
