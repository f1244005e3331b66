"""Deprecated home of the corpus utilities: use :mod:`kacq_hooks.corpus`.

The study behind ``kacq demo`` is the separate package ``kacq_study``; the library never imports it.
"""
