"""The privacy-critical core: sampling, clipping, noise, accounting, and the one place that composes them.

Imports torch, numpy and opacus only: no config, no accelerate, no tracking, no I/O.
"""
