"""Project configs for tests: KPI targets any trained model clears, so a test checks the part of
the loop it is about rather than the model's luck (the gate and the sweep have their own tests)."""

from __future__ import annotations

LENIENT_KPI = """[kpi]
max_escape_rate = 0.99
confidence = 0.9
min_automation_rate = 0.0
max_false_reject_rate = 0.99
max_corrupted_escape_rate = 1.0
"""
