"""ntkselect.selection.ntk: NTK-Selector's two stages."""
