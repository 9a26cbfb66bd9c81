"""Stage 1: a CT scan to a lung-cropped HU volume at the target spacing with its lung mask, for one
patient or a cohort."""
