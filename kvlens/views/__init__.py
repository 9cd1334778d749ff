"""Views: figures (pure functions of results), widgets, and HTML reports."""
