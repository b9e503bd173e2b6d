"""Stage two: classifier heads retrained on a feature file.

The registries of long-tailed losses, re-samplers and heads, the fused
trainer that fits many heads in one pass, cell validation, and fitting and
scoring cells (Kang et al., ICLR 2020).
"""
