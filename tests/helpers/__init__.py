"""Helpers the tests share: models, data, oracles, configs and processes (imported as `helpers.x`; fixtures
live in conftest.py).
"""
