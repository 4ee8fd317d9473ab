"""BFCL-V3 multi-turn, one concern a module (each imports only the ones before it):

- ``data``: the four categories and their entries (from the installed ``bfcl-eval`` package), ids,
  function docs, the 160/40 train/test split and subset selection;
- ``parse``: safe parsing of model-written calls (literal arguments only) and of a model step;
- ``budget``: the work budget of an entry (steps, wall time, memory) around every simulator call,
  and the process-wide state the simulators touch, kept as it was;
- ``executor``: fresh simulators per entry, a dispatcher over their public methods, work limits,
  results as strings;
- ``checker``: the state-based verdict, cumulative and reset turn rewards, the leaderboard summary;
- ``edits``: edited ground truths (dropped, wrong, extra, moved calls, split steps, empty turns);
- ``rollout``: a chat policy run through an entry's turns, trajectories as replay-buffer rows;
- ``turns``: a causal LM's answer to each turn given the ground-truth history (one KV cache per entry),
  checked, with the exact per-token KL to a reference;
- ``cli``: ``shiq-eval bfcl check-ground-truth | rollout | report | to-buffer`` (also
  ``python -m shiq_eval.bfcl``).

Import names from the submodules; this package itself holds none.
"""
