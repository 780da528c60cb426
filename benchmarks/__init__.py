"""``make bench``: seconds and peak memory of the toolkit, measured in one run on this machine.

Kept outside the package (``unraveled`` never imports from here, nor from ``tests``), run from
the repository's root: ``python -m benchmarks.bench``. See :mod:`benchmarks.bench`.
"""
