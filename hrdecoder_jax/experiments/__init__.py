"""Experiments that reproduce the paper's claims on regenerable data."""
