"""Training runs: run folders, resume, seeds, precision, distribution, and the two models' runs."""
