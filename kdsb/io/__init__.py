"""Reading and writing files: DICOM series, NIfTI / MetaImage / NRRD volumes, kdsb's HDF5 volumes,
id,cancer tables."""
