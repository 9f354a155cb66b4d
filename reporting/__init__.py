"""A run's results on disk: results.json/md/csv, the summary, the plots, report.html, the paper's numbers."""
