"""Who decided what: approvals, audit bundles and their verification, model cards."""
