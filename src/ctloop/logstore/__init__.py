"""The log store: what production did, in SQL (SQLite in the workspace by default, PostgreSQL or
any SQLAlchemy URL otherwise). Three tables: `shadow_log` (champion and challenger answers to the
same request), `request_log` (every answered request) and `feedback` (ratings and corrections keyed
by request id). Written by the server through batched background writers, read by the shadow
comparison, the production drift check and the harvest."""
