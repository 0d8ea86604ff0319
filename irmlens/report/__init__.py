"""Report exporters: report.json (schema v1) and a self-contained HTML page."""
