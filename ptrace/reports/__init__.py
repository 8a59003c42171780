"""Reports: render comparison results as a self-contained HTML page."""
