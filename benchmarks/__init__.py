"""bn_cy's benchmarks (see conftest.py and report.py).

A package so that its conftest is imported as ``benchmarks.conftest``: tests/ has a rootless
``conftest`` module that its tests import by name, and the two must not collide when both
directories run in one pytest session.
"""
