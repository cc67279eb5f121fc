"""kensa flows part (see DESIGN.md)."""
