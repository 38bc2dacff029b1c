"""From DICOM bytes to work for the router: decode (``dicom_input``), series assembly
(``series``), transport reduction and the plan of which tools read what (``work``), and the
domain errors every layer raises and every door maps (``errors``), plus the multipart/related
wire form of several instances (``multipart``).

May import serving (the tensors a work item travels as), phantoms, catalog and jobs.
"""
