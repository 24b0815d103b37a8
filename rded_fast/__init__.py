"""rded-fast: fast, faithful RDED dataset distillation.

Stages (see README): index -> plan -> loader -> score -> select -> stitch -> write, wired in
`rded_fast.distill`.
"""
__version__ = "0.1.0"
