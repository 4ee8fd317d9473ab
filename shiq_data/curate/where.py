"""``--where EXPR``: a SQL boolean expression over a shard's derived columns, evaluated by DuckDB.

The expression is never evaluated by Python. It is parsed by DuckDB first and refused unless it is one
expression without subqueries (so no table functions such as ``read_csv``, no second statement); the
connection it runs on has file and network access disabled and its configuration locked, so even a
function that slipped through could not read or write a file. A row is kept when the expression is
true (NULL counts as false).
"""

from __future__ import annotations

import json

import duckdb
import numpy as np
import pyarrow as pa

from shiq_data.curate.rows import DERIVED, TEXT_COLUMNS

TABLE = "rows"
_QUERY = "SELECT (\n{expr}\n) AS keep FROM " + TABLE  # (on lines of its own: a trailing -- comment ends there)


SHOWN_CHARS = 200  # an expression longer than this is shown by its start and its length


def shown(expr: str, quote: bool = False) -> str:
    """``expr`` as a message shows it (``repr``-quoted with ``quote``): whole, or when longer than
    :data:`SHOWN_CHARS` (a list of thousands of row ids) its first 100 characters and its length, so that a status
    line or an error stays one short line."""
    if len(expr) <= SHOWN_CHARS:
        return repr(expr) if quote else expr
    start = repr(expr[:100]) if quote else expr[:100]
    return f"{start}... ({len(expr):,} characters)"


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _walk(node):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def sandbox() -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection that cannot touch files or the network (configuration locked)."""
    con = duckdb.connect(
        ":memory:",
        config={
            "enable_external_access": False,
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
            "python_enable_replacements": False,
            "threads": 1,
        },
    )
    con.execute("SET lock_configuration = true")
    return con


class Where:
    """A checked ``--where`` expression; :meth:`mask` evaluates it on a table of derived columns."""

    def __init__(self, expr: str):
        self.expr = expr
        if not expr or not expr.strip():
            raise ValueError('--where: empty expression; give a SQL boolean expression such as "reward > 0"')
        self.con = sandbox()
        self.sql = _QUERY.format(expr=expr)
        try:
            tree = json.loads(self.con.execute("SELECT json_serialize_sql(?)", [self.sql]).fetchall()[0][0])
        except RecursionError:  # (its syntax tree, nested past Python's limit)
            raise ValueError(f"--where {shown(expr, True)}: nested too deep") from None
        if tree.get("error"):
            problem = (tree.get("error_message") or "not valid SQL").strip().splitlines()[0]
            if "max_expression_depth" in problem:  # (DuckDB's advice, a SET, is not the user's to give)
                problem = "nested too deep (DuckDB's parser takes at most 1000 levels)"
            raise ValueError(f"--where {shown(expr, True)}: {problem}")
        statements = tree.get("statements", [])
        node = statements[0].get("node", {}) if len(statements) == 1 else {}
        simple = (
            node.get("type") == "SELECT_NODE"
            and len(node.get("select_list", [])) == 1
            and (node.get("from_table") or {}).get("type") == "BASE_TABLE"
            and (node.get("from_table") or {}).get("table_name") == TABLE
            and (node.get("from_table") or {}).get("sample") is None
            and not node.get("modifiers")
            and node.get("where_clause") is None
            and not node.get("group_expressions")
            and node.get("having") is None
            and node.get("qualify") is None
            and node.get("sample") is None
            and node.get("aggregate_handling", "STANDARD_HANDLING") == "STANDARD_HANDLING"  # (GROUP BY ALL)
            and not (node.get("cte_map") or {}).get("map")
        )
        if not simple:
            raise ValueError(
                f"--where {shown(expr, True)}: must be a single SQL boolean expression over the row's columns"
            )
        inner = node["select_list"]
        if any(n.get("class") == "SUBQUERY" or n.get("type") in ("SUBQUERY", "TABLE_FUNCTION") for n in _walk(inner)):
            raise ValueError(
                f"--where {shown(expr, True)}: subqueries are not allowed (the expression sees one row's columns)"
            )
        if any(n.get("class") == "STAR" for n in _walk(inner)):  # COLUMNS(...) gives one value per column
            raise ValueError(f"--where {shown(expr, True)}: * and COLUMNS(...) are not allowed: name the columns")
        aggregates = {
            r[0]
            for r in self.con.sql(
                "SELECT function_name FROM duckdb_functions() WHERE function_type = 'aggregate'"
            ).fetchall()
        }
        used = {n.get("function_name", "").lower() for n in _walk(inner) if n.get("class") == "FUNCTION"}
        if used & aggregates:
            raise ValueError(
                f"--where {shown(expr, True)}: aggregate functions ({', '.join(sorted(used & aggregates))}) are not allowed "
                "(the expression sees one row's columns)"
            )
        # unnest gives a row per list element: a row count that happens to match would shift the rows kept
        set_returning = {"unnest", "unlist"} | {
            r[0]
            for r in self.con.sql(
                "SELECT function_name FROM duckdb_functions() WHERE function_type = 'macro' "
                "AND macro_definition ILIKE '%unnest(%'"
            ).fetchall()
        }
        if used & set_returning:
            raise ValueError(
                f"--where {shown(expr, True)}: {', '.join(sorted(used & set_returning))} gives several values per row, which "
                "is not allowed (the expression gives one value per row: list functions such as list_contains read a list)"
            )
        if any(n.get("class") == "WINDOW" for n in _walk(inner)):
            raise ValueError(
                f"--where {shown(expr, True)}: window functions are not allowed (the expression sees one row's columns)"
            )
        self.columns = {
            name.lower() for n in _walk(inner) if n.get("class") == "COLUMN_REF" for name in n.get("column_names", [])
        }

    def needs(self, names) -> bool:
        """Whether the expression names any of ``names``."""
        return bool(self.columns & {n.lower() for n in names})

    def needs_extra_keys(self) -> bool:
        """Whether the expression names a column other than the derived ones (a key of ``extra``)."""
        return bool(self.columns - set(DERIVED))

    def mask(self, view: pa.Table, shard=None) -> np.ndarray:
        """``[N]`` bool: the rows of ``view`` (a table of derived columns) where the expression is true; an
        error the rows' values raise (a cast that fails on one shard's text) names ``shard``, their file."""
        self.con.register(TABLE, view)
        try:
            result = self.con.sql(self.sql).to_arrow_table()
        except duckdb.Error as e:
            columns = ", ".join(view.schema.names + [c for c in TEXT_COLUMNS if c not in view.schema.names])
            where = f" on the rows of {shard}" if shard is not None and view.num_rows else ""
            raise ValueError(
                f"--where {shown(self.expr, True)}: {_first_line(e)}{where} (columns: {columns})"
            ) from None
        finally:
            self.con.unregister(TABLE)
        keep = result.column("keep")
        if not pa.types.is_boolean(keep.type) and not pa.types.is_null(keep.type):
            raise ValueError(
                f"--where {shown(self.expr, True)}: must be a boolean expression, it gives {keep.type} values"
            )
        if len(keep) != view.num_rows:
            raise ValueError(
                f"--where {shown(self.expr, True)}: must be a per-row expression (no aggregate such as count(*))"
            )
        if pa.types.is_null(keep.type):
            return np.zeros(view.num_rows, dtype=bool)
        return np.asarray(keep.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)
