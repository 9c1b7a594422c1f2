"""Analyse studies already in a PACS over DICOMweb: QIDO-RS to find them, WADO-RS to fetch, STOW-RS back.

``fracdet pacs pull --dicomweb URL (--study UID | --since DATE)`` runs :func:`pull`: for each projection
radiograph of the chosen studies (series of :data:`fracdet.data.dicom.RADIOGRAPH_MODALITIES`, never
fracdet's own), the same analysis and the same three result objects as the node's
(:mod:`fracdet.dicom.results`), stored back into the same study. Its table names images by the keyed hash
of their study and their position, never by an identifier.
"""

from __future__ import annotations

import datetime
import functools
import logging
import re
from collections.abc import Callable
from typing import Any

import pandas as pd

from fracdet.data.decode import ImageReadError
from fracdet.data.dicom import RADIOGRAPH_MODALITIES, keyed_hash, read_dicom_header
from fracdet.dicom.dicomweb import DicomWeb, RetrievalError, failure, refused_by_stow
from fracdet.dicom.results import SERIES_DESCRIPTION, is_fracdet_result, results_for
from fracdet.inference.gate import NotARadiographError
from fracdet.inference.predictor import Predictor
from fracdet.models.release import TrainedModel
from fracdet.utils.progress import progress

__all__ = ["PullError", "pull", "read_instance"]

log = logging.getLogger(__name__)

_STUDY, _SERIES, _INSTANCE = "0020000D", "0020000E", "00080018"
_MODALITY, _DESCRIPTION = "00080060", "0008103E"
#: Searches are read a page at a time (QIDO-RS ``limit`` and ``offset``): a server may list no more than its
#: own maximum in one answer and say so only in a Warning header (PS3.18), which dicomweb-client does not pass
#: on, so a single search would silently leave the rest of the studies out.
PAGE = 1000
#: At most this many matches a search: past it, the search is cut there and the log says so.
MAX_MATCHES = 100_000


class PullError(RuntimeError):
    """The DICOMweb server could not be searched at all; the message names neither the URL nor identifiers."""


#: A WADO-RS instance URL: ``ROOT/studies/S/series/R/instances/I``.
_INSTANCE_URL = re.compile(r"^(?P<root>https?://.+?)/studies/(?P<study>[^/]+)/series/(?P<series>[^/]+)"
                           r"/instances/(?P<instance>[^/?#]+)/?$")  # fmt: skip


def read_instance(url: str) -> bytes:
    """The DICOM file that a DICOMweb (WADO-RS) instance URL names: how archive manifests list PACS images.

    Raises ``OSError`` (a manifest row's error, never the job's end) when ``url`` is not an instance URL or
    the server does not deliver within the limits of :class:`DicomWeb`; the message names neither the URL
    nor its identifiers.
    """
    match = _INSTANCE_URL.match(url)
    if match is None:
        raise OSError("not a DICOMweb instance URL (ROOT/studies/S/series/R/instances/I)")
    return _server(match["root"]).instance(match["study"], match["series"], match["instance"])


@functools.lru_cache(maxsize=8)
def _server(root: str) -> DicomWeb:
    """One server (and its connection pool) per root and process."""
    return DicomWeb(root)


def _value(item: dict, tag: str) -> str:
    values = item.get(tag, {}).get("Value") or [""]
    return str(values[0])


def _paged(search: Callable[..., list[dict]], key: str) -> list[dict]:
    """Every match of ``search`` (a dicomweb-client search, given ``limit`` and ``offset``), page after page
    until one is empty or brings nothing new (a server that ignores ``offset`` answers the first again)."""
    found: dict[str, dict] = {}
    offset = 0
    while True:
        page = search(limit=PAGE, offset=offset)
        before = len(found)
        found.update((_value(item, key), item) for item in page)
        if not page or len(found) == before:
            return list(found.values())
        if len(found) >= MAX_MATCHES:
            log.warning("a search matched more than %d: the rest is left out (narrow the search)", MAX_MATCHES)
            return list(found.values())[:MAX_MATCHES]
        offset += len(page)


def _studies(client: Any, *, study: str | None, since: str | None) -> list[str]:
    if study:
        return [study]
    try:
        dates = {"StudyDate": f"{since.replace('-', '')}-"}
        found = _paged(functools.partial(client.search_for_studies, search_filters=dates), _STUDY)
        return [_value(item, _STUDY) for item in found]
    except Exception as exc:  # nothing to do without it: the run's end, in one line
        raise PullError(f"the DICOMweb server did not answer the study search ({failure(exc)})") from None


def _radiographs(client: Any, study: str) -> list[tuple[str, str]]:
    """(series, instance) of every projection radiograph in ``study``, fracdet's own series left out."""
    out = []
    for series in _paged(functools.partial(client.search_for_series, study), _SERIES):
        if _value(series, _MODALITY) not in RADIOGRAPH_MODALITIES:
            continue
        if _value(series, _DESCRIPTION).startswith(SERIES_DESCRIPTION.split(" ")[0]):
            continue  # our own results (SR, GSPS, SC): never analysed
        series_uid = _value(series, _SERIES)
        instances = _paged(functools.partial(client.search_for_instances, study, series_uid), _INSTANCE)
        out += [(series_uid, _value(i, _INSTANCE)) for i in instances]
    return out


def pull(server: DicomWeb, model: TrainedModel, *, study: str | None = None, since: str | None = None) -> pd.DataFrame:
    """Analyse the radiographs of one study (``study``) or of every study since a date (``since``,
    ``YYYY-MM-DD``) on ``server`` and store the results back; one row per radiograph, each fetched within the
    server's limits and read by fracdet's own bounded reader.

    Columns: ``study`` (keyed hash), ``image`` (its position in the study; 0 for a study whose series
    could not be listed), ``probability``, ``label``, ``level``, ``boxes`` (count), ``stored`` (result objects
    sent back), ``error``.

    Raises:
        PullError: the study search (``since``) failed: there is nothing to analyse.
        ValueError: ``since`` is not a date.
    """
    if (study is None) == (since is None):
        raise ValueError("give one of study or since")
    if since is not None:
        datetime.date.fromisoformat(since)  # a ValueError that names it, before the server is asked
    predictor = Predictor(model, heatmaps=True)
    rows = []
    work = []
    client = server.client
    for study_uid in _studies(client, study=study, since=since):
        try:
            work += [(study_uid, series, instance) for series, instance in _radiographs(client, study_uid)]
        except Exception as exc:  # this study's row says so (an unknown UID: HTTP 404); the others go on
            rows.append({"study": keyed_hash(study_uid), "image": 0, "probability": None, "label": None,
                         "level": None, "boxes": 0, "stored": 0,
                         "error": f"the series search failed ({failure(exc)})"})  # fmt: skip
            log.warning("study %s: the series search failed (%s)", keyed_hash(study_uid), failure(exc))
    position: dict[str, int] = {}
    for study_uid, series_uid, instance_uid in progress(work, desc="pulling", total=len(work)):
        hashed = keyed_hash(study_uid)
        position[hashed] = position.get(hashed, 0) + 1
        row: dict[str, Any] = {"study": hashed, "image": position[hashed], "probability": None, "label": None,
                               "level": None, "boxes": 0, "stored": 0, "error": None}  # fmt: skip
        name = f"{hashed}/{position[hashed]}"
        try:
            data = server.instance(study_uid, series_uid, instance_uid)
            if is_fracdet_result(read_dicom_header(data, name=name)):  # a series description someone changed:
                continue  # the manufacturer still says so
            prediction = predictor.predict_bytes(data, name)
            results = results_for(data, prediction, model)
            refused = refused_by_stow(client.store_instances(results.all()))
        except (ImageReadError, NotARadiographError) as exc:
            row["error"] = str(exc)
        except RetrievalError as exc:  # too large, too slow, not DICOM: said without URL or identifier
            row["error"] = f"{name}: {exc}"
            log.warning("image %d of study %s: %s", position[hashed], hashed, exc)
        except Exception as exc:  # a server or network failure: this image's error, not the run's end
            row["error"] = f"{name}: {type(exc).__name__}"
            log.warning("image %d of study %s failed: %s", position[hashed], hashed, type(exc).__name__)
        else:
            row.update(probability=round(prediction.probability, 6), label=prediction.label, level=prediction.level,
                       boxes=len(prediction.boxes), stored=3 - len(refused))  # fmt: skip
            if refused:  # a 202: the PACS kept some and said which it did not
                said = f"STOW-RS did not store {len(refused)} of 3 results ({', '.join(f'0x{r:04X}' for r in refused)})"
                row["error"] = f"{name}: {said}"
                log.warning("image %d of study %s: %s", position[hashed], hashed, said)
        rows.append(row)
    return pd.DataFrame(rows, columns=["study", "image", "probability", "label", "level", "boxes", "stored", "error"])
