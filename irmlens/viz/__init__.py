"""Plotly figures of a study (each a function returning a ``go.Figure``)."""
