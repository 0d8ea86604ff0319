"""Report exporters: report.json (schema: docs/report-schema.md) and a self-contained HTML page."""
