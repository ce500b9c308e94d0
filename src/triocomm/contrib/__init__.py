"""Integrations built on triocomm's public API, each an optional extra.

``triocomm.contrib.prometheus`` (``pip install triocomm[prometheus]``): a
:class:`~triocomm.Observer` that exports metrics to Prometheus.
"""
