"""The operator console: server-rendered pages under /console for the people around the line
(review queue, alerts, models and approvals, the line at a glance), signed in with an API key."""

from kensa.serving.console.app import create_console, mount_console

__all__ = ["create_console", "mount_console"]
