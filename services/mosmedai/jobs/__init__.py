"""Durable state: the object store (``storage``), the job store of accepted studies and their
results (``store``), and the de-identified archive copy (``deid``).

The lowest layer: imports nothing of mosmedai but ``mosmedai.config``.
"""
