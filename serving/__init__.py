"""kensa serving part (see DESIGN.md)."""
