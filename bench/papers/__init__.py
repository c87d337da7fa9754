"""Experiments that reproduce claims of the papers behind dpkernels' methods (README: "Reproducing the papers")."""
