"""report.md with its figures and tables (markdown, plots, headplots, plotstyle), and the demo's checks of the
paper's claims (checks)."""
