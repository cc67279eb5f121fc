"""Who may call what, and how much: API keys, roles, body limits."""
