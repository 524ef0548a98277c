"""Transports: one module per URL scheme, each implementing ``base.Transport``.

Modules here are imported on first use through ``dataplane.registry``, never by
``import dataplane``, so their optional dependencies stay optional.
"""
