"""Layer config: the typed knobs and the training recipe, the one tree of defaults that search
spaces, presets and ``--set`` only override. Imports only ``errors``; every other layer reads it.
"""
