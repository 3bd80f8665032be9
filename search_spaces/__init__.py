"""Declarative AutoDropout search spaces: YAML files shipped with the package and their loader.

A space lists, per dropout site, the choices for every decision of a pattern; the loader
validates it and maps controller token indices to a :class:`autodropout.Pattern` and back.
"""
