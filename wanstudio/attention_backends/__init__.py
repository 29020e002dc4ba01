"""Attention backends: one module per family, registered by AttentionMode in ``registry``.

The entry point is :mod:`wanstudio.attention`; nothing outside it should call these directly.
"""
