"""Compile jaxsr's programs for a device topology from shapes only, and read off what
they need per chip: memory, FLOPs, HBM traffic and collectives, with a roofline
prediction of the step time (`jaxsr plan`)."""
