"""Test and demo data outside the pipeline: phantom chests, lesions implanted into real CT, DICOM
writing."""
