"""kensa monitoring part (see DESIGN.md)."""
