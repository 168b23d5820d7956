"""Old import path of the guarded SQL sandbox, kept for compatibility: the code is :mod:`rosa_peft.tasks.sqlexec`."""
from ..tasks.sqlexec import (  # noqa: F401
    HEAP_LIMIT_BYTES,
    MAX_ROWS,
    ExecutionResult,
    QueryRefused,
    build_database,
    check_timeout,
    connect,
    execute_sql,
    run_readonly,
    sql_execution_match,
    sql_execution_result,
    sqlite_memory_limit,
)
