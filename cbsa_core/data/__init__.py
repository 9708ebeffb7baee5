"""Datasets and transforms shared by the tracks."""
