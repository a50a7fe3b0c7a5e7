"""Foundation layer: argument checks, atomic checksummed files, the native-extension loader.

Nothing here imports from :mod:`bct_fast.ops` or the user API; everything else may import it.
"""
