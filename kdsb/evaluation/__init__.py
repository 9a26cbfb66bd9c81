"""After training: predictions, metrics and evaluation reports."""
