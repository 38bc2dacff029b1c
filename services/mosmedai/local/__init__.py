"""The platform on one machine: the local processes (``processes``: `make up`, `down`,
`status`), the ``mosmedai`` command line (``cli``), example studies (``examples``) and the
benchmarks (``bench``, ``bench_national``, ``http_load``).

The top layer: may import every other sub-package; nothing imports it.
"""
