"""``balpoe compare RECIPE... --seeds 1 2 3``: several methods on one split, one protocol, one table.

Every recipe is trained once per seed into ``OUT/runs/<recipe name>/seed<N>/`` (a finished run is
reused, an interrupted one continued from its last checkpoint), evaluated on the balanced test set
(its ``eval.json``) and on the test label distributions with each adaptation mode, from test logits
computed once per run (``test_logits.safetensors``).  The summary (:mod:`balpoe.compare.table`) is
the mean and standard deviation over seeds of each metric and, against a baseline method, the mean
paired difference (same seed) with its standard error; :mod:`balpoe.compare.page` writes it as
``compare.json``, ``compare.md`` and ``compare.html`` (with figures).
"""
