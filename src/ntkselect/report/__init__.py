"""ntkselect.report.html: `ntkselect report`."""
