"""From request bytes to a logged verdict: decode, batch, engine, hot swap, log."""
