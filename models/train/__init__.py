"""Training: seeded, early-stopped, DDP-ready, with a self-describing checkpoint."""
