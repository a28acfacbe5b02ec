"""ntkselect.diagnostics: `ntkselect diagnose`."""
