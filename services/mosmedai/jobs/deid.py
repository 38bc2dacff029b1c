"""De-identification for the archive: DICOM PS3.15 Annex E, Basic Application Level
Confidentiality Profile.

The attribute actions (D, Z, X, K, C, U and their combinations of Table E.1-1) come from
`dicom-anonymizer` (KitwareMedical), which ships Table E.1-1 as generated from the
standard's text; we use its newest table (``dicomfields_2026c``) and its private-tag removal.
Two deviations, both inside what the profile allows:

* UIDs (action U) are replaced by a keyed hash (``2.25.<int>`` from HMAC-SHA256 of the
  original UID under `uid_secret`) instead of the library's process-global random map: the
  same original UID gives the same replacement in every process and across restarts, so the
  instances of one study stay one study in the archive, and the map cannot grow without
  bound in a long-running service. Without the secret nobody can map replacements back.
* De-identification attributes are set as the profile requires: PatientIdentityRemoved
  ``YES``, DeidentificationMethod naming this profile, and DeidentificationMethodCodeSequence
  with (113100, DCM, "Basic Application Confidentiality Profile").

Not covered (outside the Basic profile's attribute actions): identifying text burned into
the pixels (Clean Pixel Data option) and in free-text inside SR content items. The archive
is a de-identified copy for quality work, not a publication-grade data set.

Evaluated and not chosen: `deid` 0.4.13 (its default recipe removes every ``*UID``/``*ID``
attribute, SOP Instance UID included, which leaves objects that are not valid DICOM, and it
is not Table E.1-1); `dicognito` 0.19 (a pseudonymiser: fake names, shifted dates, keeps
private tags; not the Annex E table).
"""

from __future__ import annotations

import hashlib
import hmac
import io
from typing import Any, Callable

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID

DEID_METHOD = "PS3.15 E.1 Basic Application Confidentiality Profile"  # LO: <= 64
TABLE = "dicomfields_2026c"


class DeidentificationError(ValueError):
    """The object could not be read or de-identified."""


def keyed_uid(uid: str, secret: bytes) -> str:
    """A stable replacement UID: 2.25.<128-bit integer of HMAC-SHA256(secret, uid)>."""
    digest = hmac.new(secret, uid.strip().encode("ascii", "replace"), hashlib.sha256).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def _uid_action(secret: bytes) -> Callable[[Dataset, Any], None]:
    def replace_uid(dataset: Dataset, tag: Any) -> None:
        element = dataset.get(tag)
        if element is None or element.value in (None, ""):
            return
        if element.VM > 1:
            element.value = [keyed_uid(str(v), secret) for v in element.value]
        else:
            element.value = keyed_uid(str(element.value), secret)

    return replace_uid


def _rules(secret: bytes) -> Callable[[], dict]:
    from dicomanonymizer import simpledicomanonymizer as sda

    def rules() -> dict:
        actions = sda.initialize_actions(TABLE)
        replace_uid = _uid_action(secret)
        uid_actions = {sda.replace_UID, sda.delete_or_empty_or_replace_UID}
        return {tag: (replace_uid if action in uid_actions else action) for tag, action in actions.items()}

    return rules


def deidentify(part10: bytes, *, uid_secret: bytes = b"mosmedai-local") -> bytes:
    """The Part 10 object with the Basic profile applied, as Part 10 bytes.

    uid_secret: the deployment's key for UID replacement (Settings.deid_uid_secret); the
    default is for local use only.
    """
    from dicomanonymizer import simpledicomanonymizer as sda

    try:
        ds = pydicom.dcmread(io.BytesIO(part10), force=False)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for bad input
        raise DeidentificationError(f"not a readable DICOM Part 10 object: {exc}") from exc
    try:
        sda.anonymize_dataset(ds, None, delete_private_tags=True, base_rules_gen=_rules(uid_secret))
    except Exception as exc:  # noqa: BLE001
        raise DeidentificationError(f"de-identification failed: {type(exc).__name__}: {exc}") from exc

    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = DEID_METHOD
    code = Dataset()
    code.CodeValue = "113100"
    code.CodingSchemeDesignator = "DCM"
    code.CodeMeaning = "Basic Application Confidentiality Profile"
    ds.DeidentificationMethodCodeSequence = [code]
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = UID(ds.SOPInstanceUID)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()
