"""The kensa SQL store: tables, engines, migrations, the audit trail and API keys.

Submodules: ``models`` (tables), ``engine`` (``make_engine``, ``make_session_factory``),
``migrate`` (``upgrade``, ``current_revision``), ``audit`` (hash-chained events) and ``keys``
(API keys). Import them directly; this package imports nothing so ``kensa --help`` stays fast.
"""
