"""ntkselect.selection: selectors: random, embedding, bm25, less, tsds, ntk."""
