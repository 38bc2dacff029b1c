"""What a study's answer is made of: wire schemas (``schemas``), router outputs shaped into
findings (``findings``), the DICOM SR and secondary captures (``dicom_objects``), the records of
which versions answered a study (``answered``) and radiologists' feedback (``feedback``).

May import pipeline (decoded images and their grayscale), serving, phantoms, catalog and jobs.
"""
