"""Run a SQL query against mock tables: a re-export of the one sqlite sandbox,
:mod:`rosa_peft.eval.sql_exec` (read-only, time- and memory-bounded).

Used by the built-in ``sql-synth`` task to check every gold query at generation time. Kept so that
``from rosa_peft.tasks.sqlexec import execute_sql`` goes on working; there is no second builder.
"""
from __future__ import annotations

from ..eval.sql_exec import QueryRefused, build_database, check_timeout, execute_sql, run_readonly

__all__ = ["QueryRefused", "build_database", "check_timeout", "execute_sql", "run_readonly"]
