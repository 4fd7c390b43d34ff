"""``glm-export bench``: latency of the artifact against PyTorch on the same weights.

- :mod:`glm_export.bench.run`: settings, rounds, ratios and the report (bench.json / bench.md / bench.png).
- :mod:`glm_export.bench.worker`: one side of one round in a process of its own.
- :mod:`glm_export.bench.roofline`: measured read bandwidth and the bytes a decode step must read.
- :mod:`glm_export.bench.profiling`: where a decode step's time goes (``--profile``).
"""
