"""Engines behind one interface (``base``), found through a registry (``registry``).

One module per engine; each imports its engine only when chosen.
"""
