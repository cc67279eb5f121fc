"""Console routes, one module per page: sign-in, review queue, alerts, models, line."""
