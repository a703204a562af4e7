"""Launchers: start workers locally, on a Ray cluster, or as a Slurm job."""
