"""Load tests (Locust) and the national capacity planner of mosmedai.

Entry points: ``mosmedai_load.capacity:main`` (`mosmedai capacity`), ``mosmedai_load.profile:main``
(`mosmedai profile`), ``mosmedai_load.loadtest:main`` (`make loadtest`); the Locust file is
``locustfile.py`` in this package. See load_tests/README.md.
"""
