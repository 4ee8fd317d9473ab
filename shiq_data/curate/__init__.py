"""Curating replay buffers: look at, filter, deduplicate, decontaminate, split and mix them (``shiq-data
show|stats|filter|dedup|decontaminate|split|mix``).

Every verb reads a buffer shard by shard (:mod:`shiq_data.curate.rows`) and sees each row through the
same derived columns (:func:`shiq_data.curate.rows.view`), which ``--where`` expressions
(:mod:`shiq_data.curate.where`, evaluated by DuckDB with file access disabled) can name:

==========================  =====================================================================
column                      meaning
==========================  =====================================================================
``row_id``, ``source``,     as stored
``group_id``
``tokens``                  number of tokens of the row
``prompt_tokens``           number of prompt tokens (``prompt_len``)
``completion_tokens``       number of action tokens
``reward``                  the scalar reward as given (the ``reward`` text column, when the row has
                            one), else the sum of the row's per-token rewards
``has_ref``                 whether the row carries reference statistics
``prompt``, ``completion``  the text as given (text columns), else the decoded prompt tokens and
                            decoded action tokens (decoded only when an expression names them)
``turn_rewards``, ``extra`` the text columns, when the buffer has them (else NULL)
top-level keys of ``extra`` one column each (booleans, integers, floats or strings; mixed or nested
                            values as JSON text), unless the name is taken by a column above
==========================  =====================================================================

The verbs that write (filter, dedup, decontaminate, split, mix) write new buffers with
:func:`shiq_data.buffer.write_buffer` (atomically, shard by shard), keep every stored column of the
rows they keep (reference statistics included) and record the parent buffers (path and manifest
sha256) and what was done under the manifest keys ``parents`` and ``curation``.
"""
