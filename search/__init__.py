"""The sweep: the sweep file as a validated config, the Ray Tune ``Tuner`` built from it,
and the ``cxrtune`` command line. Nothing here trains a model itself.
"""
