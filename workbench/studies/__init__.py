"""Studies built on the loop, apart from its core: same-batch replay of one stale batch through
every objective (``replay``) and the prosperity-before-collapse reproduction with its report
(``prosperity``, ``prosperity_report``)."""
